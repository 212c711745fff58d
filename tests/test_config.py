"""curvsafe.config: the string options as enums, and RestoreConfig's validation and merging."""

import pytest

from curvsafe.config import FisherType, KFACApprox, Method, RestoreConfig, parse_option


def test_parse_option_names_the_option_and_its_values():
    assert parse_option(FisherType, "mc", "fisher_type") is FisherType.MC
    assert parse_option(KFACApprox, KFACApprox.REDUCE, "kfac_approx") is KFACApprox.REDUCE
    with pytest.raises(ValueError, match=r"fisher_type must be one of \('empirical', 'mc'\), got 'type2'"):
        parse_option(FisherType, "type2", "fisher_type", allowed=(FisherType.EMPIRICAL, FisherType.MC))
    with pytest.raises(ValueError, match="method must be one of"):
        parse_option(Method, "newton", "method")


@pytest.mark.parametrize("bad, match", [
    ({"method": "newton"}, "method must be one of"), ({"task_budget": -1}, "task_budget"),
    ({"benign_budget": -0.1}, "benign_budget"), ({"damping": 0}, "damping"), ({"iterations": 0}, "iterations"),
    ({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length"), ({"select_top": 0}, "select_top"),
    ({"limit": 0}, "limit"), ({"max_memory": 0}, "max_memory"), ({"dtype": "int8"}, "dtype"),
    ({"curvature_seed": -1}, "curvature_seed"), ({"shards": 2}, "needs fsdp2"),
    ({"fsdp2": True, "shards": 0}, "shards must be >= 1")])
def test_restore_config_refuses_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        RestoreConfig(**bad)


def test_restore_config_merges_settings_and_round_trips():
    base = RestoreConfig(method=Method.KFAC, iterations=3)
    merged = RestoreConfig.from_settings(base, {"damping": 0.5, "params": ("a.*",)})
    assert (merged.method, merged.iterations, merged.damping, merged.params) == ("kfac", 3, 0.5, ["a.*"])
    assert RestoreConfig(**merged.to_dict()) == merged
    with pytest.raises(TypeError, match=r"unknown RestoreConfig setting\(s\) \['iteratoins'\]"):
        RestoreConfig.from_settings(None, {"iteratoins": 2})
    assert "task loss" in RestoreConfig.help("task_budget")


def test_the_public_api_resolves_every_name_it_lists():
    import curvsafe

    for name in curvsafe.__all__:
        assert getattr(curvsafe, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        curvsafe.nope
