"""Layer capture: selection, and refusal of the silent errors of hook-based curvature."""

import pytest
import torch
import torch.nn.functional as F
from conftest import Output, TinyMLPLM, make_batch, tiny_gpt2, tiny_llama, with_lora

from curvsafe.capture import CaptureError, find_blocks
from curvsafe.curvature import KFAC


def test_selection_defaults_patterns_and_lora():
    llama = tiny_llama()
    names = [b.name for b in find_blocks(llama)]
    assert "lm_head" not in names and len(names) == 2 * 7
    assert [b.name for b in find_blocks(llama, ["*.mlp.*"])] == [n for n in names if ".mlp." in n]
    name = "model.layers.0.self_attn.q_proj"
    assert [b.name for b in find_blocks(llama, name)] == [name]
    with pytest.raises(CaptureError, match="match no"):
        find_blocks(llama, ["*.nonexistent"])
    with pytest.raises(CaptureError, match="no LoRA"):
        find_blocks(llama, "lora")
    lora = with_lora(tiny_llama())
    assert {b.name.split(".")[-2] for b in find_blocks(lora)} == {"lora_A", "lora_B"}
    assert find_blocks(lora, "lora") == find_blocks(lora)


def test_no_capturable_module():
    class NoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)

    with pytest.raises(CaptureError, match="no capturable module"):
        find_blocks(NoLinear())


def test_weight_tying_is_refused():
    with pytest.raises(CaptureError, match="tying"):
        find_blocks(tiny_gpt2(tie=True), ["lm_head"])
    assert find_blocks(tiny_gpt2(tie=False), ["lm_head"])[0].name == "lm_head"


def test_module_called_twice_is_refused():
    class Twice(TinyMLPLM):
        def forward(self, input_ids, attention_mask=None):
            h = torch.tanh(self.fc1(self.embed(input_ids)))
            return Output(self.fc2(torch.tanh(self.fc1(h))))

    with pytest.raises(CaptureError, match="ran twice"):
        KFAC(Twice().double(), ["fc1"]).fit([make_batch()])


def test_module_that_never_runs_is_refused():
    class Skips(TinyMLPLM):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Linear(6, 6)

    with pytest.raises(CaptureError, match="never ran"):
        KFAC(Skips().double(), ["fc1", "unused"]).fit([make_batch()])


def test_fused_path_that_bypasses_the_hook_is_refused():
    """fc1's weight is also used through F.linear outside fc1's forward: its gradient would not match."""

    class Fused(TinyMLPLM):
        def forward(self, input_ids, attention_mask=None):
            e = self.embed(input_ids)
            h = torch.tanh(self.fc1(e) + F.linear(e, self.fc1.weight))
            return Output(self.fc2(h))

    with pytest.raises(CaptureError, match="outside its forward"):
        KFAC(Fused().double(), ["fc1"]).fit([make_batch()])


def test_merged_lora_adapter_is_refused():
    model = with_lora(tiny_llama())
    kfac = KFAC(model)
    model.merge_adapter()
    with pytest.raises(CaptureError, match="never ran"):
        kfac.fit([make_batch()])
