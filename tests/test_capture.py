"""Layer capture: selection, and refusal of the silent errors of hook-based curvature."""

import pytest
import torch
import torch.nn.functional as F
from conftest import Output, TinyMLPLM, make_batch, tiny_gpt2, tiny_llama, with_lora

from curvsafe.capture import CaptureError, LayerCapture, find_blocks
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


def _left_padded_batch(seq=40):
    """Row 0 all padding, row 1 left-padded (its 35 tokens at the end), row 2 full: longer than the check's cut."""
    batch = make_batch(batch=3, seq=seq, pad=False)
    mask = batch["attention_mask"]
    mask[0] = 0
    mask[1, : seq - 35] = 0
    batch["input_ids"] = batch["input_ids"].masked_fill(mask == 0, 0)
    batch["labels"] = batch["labels"].masked_fill(mask == 0, -100)
    return batch


def test_hook_check_runs_on_one_short_sequence_and_leaves_the_factors_alone():
    """The check is one forward of the first non-padded row's first VERIFY_TOKENS tokens (row 1 here, whose padding
    is on the left); the pass over the data is then the same with or without it, bit for bit."""
    from curvsafe.curvature._pass import VERIFY_TOKENS

    model = tiny_llama()
    batches = [_left_padded_batch(), make_batch(seed=1)]
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (tuple(kwargs["input_ids"].shape), int(kwargs["attention_mask"].sum()))), with_kwargs=True)
    checked = KFAC(model).fit(batches)
    assert seen[0] == ((1, VERIFY_TOKENS), VERIFY_TOKENS) and seen[1:] == [((3, 40), 75), ((3, 7), 19)]
    seen.clear()
    unchecked = KFAC(model)
    unchecked._verified = True  # what a second fit of the same operator does: no check
    unchecked.fit(batches)
    handle.remove()
    assert seen == [((3, 40), 75), ((3, 7), 19)]
    for name, f in checked.factors.items():
        assert torch.equal(f.A, unchecked.factors[name].A) and torch.equal(f.G, unchecked.factors[name].G)


def test_fused_path_is_refused_whichever_row_the_check_takes():
    """The check skips padded batches, padded rows and left padding, and still sees the weight used outside its
    module; data that is all padding runs the check's forward (ranks stay in step) and is refused by the pass."""

    class Fused(TinyMLPLM):
        def forward(self, input_ids, attention_mask=None):
            e = self.embed(input_ids)
            return Output(self.fc2(torch.tanh(self.fc1(e) + F.linear(e, self.fc1.weight))))

    empty = make_batch()
    empty["attention_mask"].zero_()
    empty["labels"].fill_(-100)
    for batches in ([_left_padded_batch()], [empty, _left_padded_batch()]):
        with pytest.raises(CaptureError, match="outside its forward"):
            KFAC(Fused().double(), ["fc1"]).fit(batches)
    model = TinyMLPLM().double()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    with pytest.raises(ValueError, match="every token is ignored"):
        KFAC(model, ["fc1"]).fit([empty])
    assert seen == [(1, 7), (3, 7)]


def test_merged_lora_adapter_is_refused():
    model = with_lora(tiny_llama())
    kfac = KFAC(model)
    model.merge_adapter()
    with pytest.raises(CaptureError, match="never ran"):
        kfac.fit([make_batch()])


def test_non_finite_output_gradient_is_refused_once_per_backward_naming_the_first_block():
    """The hooks only record each output gradient's sum (no wait for the device per block); ``check_backward``
    refuses the backward, naming the first block in backward order whose gradient is not finite, and a clean
    backward afterwards passes."""
    from curvsafe.capture import LayerCapture

    model = tiny_llama(dtype=torch.float32)
    blocks = find_blocks(model)
    seen = []
    batch = make_batch()

    def poison(module, grad_input, grad_output):  # NaN into the gradients of gate_proj's and up_proj's outputs
        return tuple(torch.full_like(g, float("nan")) if g is not None else None for g in grad_input)

    with LayerCapture(blocks, lambda b, a: None, lambda b, g: seen.append(b.name)) as capture:
        handle = model.model.layers[0].mlp.down_proj.register_full_backward_hook(poison)
        capture.expect_forward(batch["attention_mask"].bool())
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().backward()
        assert len(seen) == len(blocks)  # every hook ran: none stopped the backward
        with pytest.raises(FloatingPointError, match=r"layers\.0\.mlp\.(gate|up)_proj'"):
            capture.check_backward()
        handle.remove()
        capture.expect_forward(batch["attention_mask"].bool())
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().backward()
        capture.check_backward()


def test_dora_blocks_capture_the_data_path_not_the_weight_norm_calls():
    """PEFT calls a DoRA adapter's lora_A on an identity matrix (and lora_B on the result) for the weight norm, used
    detached: the capture skips those calls, and the inputs and output gradients it hands over are the data path's,
    so sum_t g_t a_t^T is autograd's gradient of every lora_A and lora_B weight (float64)."""
    model = with_lora(tiny_llama(), dora=True)
    blocks = find_blocks(model)
    assert {b.name.split(".")[-2] + b.dora for b in blocks} == {"lora_AA", "lora_BB"}
    assert all("magnitude" not in b.name for b in blocks)
    inputs, grads = {}, {}
    batch = make_batch()
    with LayerCapture(blocks, lambda b, a: inputs.__setitem__(b.name, a),
                      lambda b, g: grads.__setitem__(b.name, g)) as capture:
        capture.expect_forward(batch["attention_mask"])
        loss = model(**batch).loss
        capture.check_forward()
        loss.backward()
        capture.check_backward()
    for b in blocks:
        assert inputs[b.name].shape[0] == int(batch["attention_mask"].sum())
        torch.testing.assert_close(grads[b.name].T @ inputs[b.name], b.module.weight.grad, rtol=1e-10, atol=1e-12)
    fitted = KFAC(model, fisher_type="empirical").fit([batch, make_batch(seed=1)], gradient=True)
    assert set(fitted.factors) == {b.name for b in blocks}
    assert fitted.inverse_mv(fitted.gradient, damping=1e-3).keys() == fitted.gradient.keys()


def test_curvsafe_guards_a_dora_adapter_and_screens_its_examples():
    """CurvSafe with screening on a DoRA adapter: the per-example gradients add up to the gradient (no mismatch);
    the magnitude vectors, no linear block, are the wrapped optimizer's to update."""
    from curvsafe.optim import CurvSafe

    model = with_lora(tiny_llama(), dora=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = CurvSafe(torch.optim.AdamW(params, lr=1e-2), model, [make_batch(seed=2)], screen=0.5)
    magnitude = next(p for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    before = magnitude.detach().clone()
    for seed in range(3):
        opt.zero_grad()
        model(**make_batch(seed=seed)).loss.backward()
        opt.step()
        assert not opt.constraint.screen.mismatch
    assert "lora_magnitude_vector" not in " ".join(opt.constraint.params)
    assert not torch.equal(magnitude, before)
