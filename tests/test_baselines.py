"""Baselines (``restoration/baselines.py``): revert, Safe LoRA and RESTA end to end, within the task budget."""

import pytest
from conftest import restore_files


@pytest.mark.parametrize("method", ["revert", "safelora", "resta"])
def test_baselines_respect_the_budget(setup, tmp_path, method):
    report = restore_files(setup, tmp_path / method, method).report
    assert report["task_nll"]["after"] <= report["task_nll"]["budget"] + 1e-9
    assert report["safety_objective"]["after"] < report["safety_objective"]["before"]
    assert (tmp_path / method / ("model" if method == "resta" else "adapter")).is_dir()
