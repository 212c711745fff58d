"""K-FAC factors against curvlinops and exact GGN blocks; padding, MC, EMA, bad input."""

import gc
import weakref

import pytest
import torch
from conftest import DeepLinear, make_batch, rel_err, tiny_gpt2, tiny_llama, tiny_qwen2, with_lora

from curvsafe.curvature import EKFAC, KFAC, MSELoss
from curvsafe.curvature import eigen as eigen_module
from curvsafe.curvature.lowrank import LowRank, SketchedFactor


class CurvlinopsLM(torch.nn.Module):
    """curvlinops wants (batch, classes, positions) outputs: logits of positions 0..T-2 (HF's shift)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits[:, :-1].transpose(1, 2)


def conv1d_as_linear(model):
    """A copy of a GPT-2 model with every Conv1D replaced by the equivalent nn.Linear (curvlinops has no Conv1D)."""
    import copy

    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, Conv1D):
            lin = torch.nn.Linear(mod.nx, mod.nf).to(mod.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin


def curvlinops_kfac(model, blocks, batch, fisher_type, approx):
    from curvlinops import KFACLinearOperator

    model = conv1d_as_linear(model).eval()  # we fit in eval mode (no dropout)
    params = [model.get_submodule(b.name).weight for b in blocks]
    op = KFACLinearOperator(CurvlinopsLM(model), torch.nn.CrossEntropyLoss(reduction="sum"), params,
                            [(batch["input_ids"], batch["input_ids"][:, 1:])], fisher_type=fisher_type,
                            kfac_approx=approx, check_deterministic=False)
    op.compute_kronecker_factors()
    return op


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2, lambda: tiny_gpt2(tie=True)])
def test_factors_match_curvlinops(make_model, approx):
    """Unpadded batch, every label counted. curvlinops with a sum-reduced loss has A = ours and
    G = (batch * seq) * ours (it sums over tokens; we average over the non-padding tokens)."""
    model = make_model()
    batch = make_batch(pad=False, prompt=0)
    ours = KFAC(model, kfac_approx=approx).fit([batch])
    ref = curvlinops_kfac(model, ours.blocks, batch, "empirical", approx)
    n, t = batch["input_ids"].shape
    for name, f in ours.factors.items():
        assert f.A.dtype == torch.float32 and torch.equal(f.A, f.A.T) and torch.equal(f.G, f.G.T)
        assert rel_err(f.A, ref._input_covariances[f"m.{name}"]) <= 1e-6
        assert rel_err(f.G * (n * t), ref._gradient_covariances[f"m.{name}"]) <= 1e-6


def test_conv1d_and_lora_blocks():
    gpt2 = KFAC(tiny_gpt2())
    kinds = {b.kind for b in gpt2.blocks}
    assert kinds == {"conv1d"} and all(".lm_head" not in b.name for b in gpt2.blocks)
    c_attn = next(b for b in gpt2.blocks if b.name.endswith("0.attn.c_attn"))
    assert (c_attn.d_in, c_attn.d_out) == (16, 48)
    lora = KFAC(with_lora(tiny_llama()))
    assert all(".lora_A." in b.name or ".lora_B." in b.name for b in lora.blocks)
    assert len(lora.blocks) == 2 * 3 * 2  # A and B, 3 targets, 2 layers


def test_blocks_sharing_an_input_share_its_factor_and_nothing_else():
    """q/k/v LoRA-A blocks see the same input tensor: their A factors are computed once and equal a fit of each
    block alone; o_proj's differs; G factors stay per block."""
    model = with_lora(tiny_llama(), targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    batches = [make_batch(pad=True, seed=s) for s in range(2)]
    joint = KFAC(model).fit(batches).factors
    layer = "base_model.model.model.layers.0.self_attn"
    names = {t: f"{layer}.{t}.lora_A.default" for t in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for t, name in names.items():
        alone = KFAC(model, [name]).fit(batches).factors[name]
        assert rel_err(joint[name].A, alone.A) <= 1e-6 and rel_err(joint[name].G, alone.G) <= 1e-6, t
    assert torch.equal(joint[names["q_proj"]].A, joint[names["v_proj"]].A)
    assert joint[names["q_proj"]].A is not joint[names["k_proj"]].A  # equal values, separate tensors
    assert not torch.allclose(joint[names["q_proj"]].A, joint[names["o_proj"]].A)
    assert not torch.allclose(joint[names["q_proj"]].G, joint[names["k_proj"]].G)
    # a second fit knows the sharing from its first batch on (the first fit learned it at its second block)
    split = KFAC(model)
    split.fit(batches[:1])
    split.fit(batches[1:])
    for name in names.values():
        assert rel_err(split.factors[name].A, joint[name].A) <= 1e-6 and torch.equal(split.factors[name].A,
                                                                                     split.factors[name].A.T)
    assert torch.equal(split.factors[names["q_proj"]].A, split.factors[names["k_proj"]].A)


def test_fit_under_bf16_autocast_is_accepted_and_close():
    """accelerate wraps model.forward in autocast (the Trainer with bf16): hooks then see float32 inputs and
    bfloat16 output gradients; the weight-gradient check must allow bf16 rounding, not cry 'fused path'."""
    model = with_lora(tiny_llama(torch.float32))
    batches = [make_batch(pad=True, seed=s) for s in range(2)]
    exact = KFAC(model).fit(batches).factors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = KFAC(model).fit(batches, gradient=True).factors
    for name, f in exact.items():
        assert rel_err(mixed[name].A, f.A) < 5e-2 and rel_err(mixed[name].G, f.G) < 5e-2, name


def test_padding_never_counts():
    """Extra padding columns (and a fully padded extra row) leave both factors unchanged."""
    model = tiny_llama()
    batch = make_batch(pad=True)
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :3]) + (-100 if k == "labels" else 0)], dim=1)
              for k, v in batch.items()}
    padded = {k: torch.cat([v, torch.zeros_like(v[:1]) + (-100 if k == "labels" else 0)]) for k, v in padded.items()}
    a = KFAC(model).fit([batch]).factors
    b = KFAC(model).fit([padded]).factors
    for name in a:
        assert rel_err(b[name].A, a[name].A) <= 1e-6 and rel_err(b[name].G, a[name].G) <= 1e-6


def test_prompt_tokens_count_in_both_factors():
    """Prompt tokens (labels -100) still get a gradient through attention, so they change G."""
    model = tiny_llama()
    full = make_batch(pad=False, prompt=0)
    prompted = dict(full, labels=full["labels"].clone())
    prompted["labels"][:, :3] = -100
    a, b = KFAC(model).fit([full]).factors, KFAC(model).fit([prompted]).factors
    name = next(iter(a))
    assert torch.allclose(a[name].A, b[name].A)  # same tokens
    assert not torch.allclose(a[name].G, b[name].G)


def test_deep_linear_mse_one_datum_equals_exact_ggn_block():
    torch.manual_seed(0)
    model = DeepLinear().double()
    x = torch.randn(1, 1, 4, dtype=torch.float64)
    y = torch.randn(1, 1, 2, dtype=torch.float64)
    batch = {"input_ids": x, "attention_mask": torch.ones(1, 1, dtype=torch.long), "labels": y}
    kfac = KFAC(model, fisher_type="type2", loss=MSELoss()).fit([batch])
    for i, layer in enumerate(model.layers):
        w = layer.weight

        def out_of(wi, i=i):
            h = x.reshape(1, 4)
            for j, other in enumerate(model.layers):
                h = h @ (wi if j == i else other.weight).T
            return h.reshape(-1)

        J = torch.autograd.functional.jacobian(out_of, w).reshape(2, -1)  # (outputs, params), row-major W
        ggn = J.T @ J  # MSE 0.5||.||^2 has output Hessian I
        f = kfac.factors[f"layers.{i}"]
        # row-major vec(W): the GGN block is G ⊗ A
        assert rel_err(torch.kron(f.G.double(), f.A.double()), ggn) <= 1e-6


def test_mc_is_seeded_and_unbiased_for_type2():
    model = tiny_llama()
    batch = make_batch(batch=4, seq=9)
    first = KFAC(model, fisher_type="mc", seed=3).fit([batch]).factors
    again = KFAC(model, fisher_type="mc", seed=3).fit([batch]).factors
    other = KFAC(model, fisher_type="mc", seed=4).fit([batch]).factors
    name = next(iter(first))
    assert torch.equal(first[name].G, again[name].G)
    assert not torch.equal(first[name].G, other[name].G)
    mc = KFAC(model, fisher_type="mc", seed=0).fit([batch] * 300).factors  # 300 draws on the same batch
    exact = KFAC(model, fisher_type="type2").fit([batch]).factors
    stacked_mc = torch.cat([mc[n].G.reshape(-1) / exact[n].G.norm() for n in exact])
    stacked_exact = torch.cat([exact[n].G.reshape(-1) / exact[n].G.norm() for n in exact])
    assert rel_err(stacked_mc, stacked_exact) < 0.15  # Monte Carlo error over 300 draws, blocks weighted equally
    for n in exact:
        assert rel_err(mc[n].A, exact[n].A) < 1e-5  # fp32 running sum over 300 batches


def test_running_mean_and_ema():
    model = tiny_llama()
    b1, b2 = make_batch(seed=1), make_batch(seed=2, batch=2, pad=False)
    both = KFAC(model).fit([b1, b2]).factors
    split = KFAC(model).fit([b1])
    split.fit([b2])
    t1, t2 = int(b1["attention_mask"].sum()), int(b2["attention_mask"].sum())
    one, two = KFAC(model).fit([b1]).factors, KFAC(model).fit([b2]).factors
    for n in both:
        expected = (one[n].A * t1 + two[n].A * t2) / (t1 + t2)
        assert rel_err(both[n].A, expected) <= 1e-6 and rel_err(split.factors[n].A, expected) <= 1e-6
    ema = KFAC(model, ema_decay=0.9).fit([b1]).fit([b2]).factors  # each fit's mean is merged into the EMA
    first = KFAC(model, ema_decay=0.9).fit([b1, b2]).factors  # the first fit is its own mean
    for n in ema:
        assert rel_err(ema[n].G, 0.9 * one[n].G + 0.1 * two[n].G) <= 1e-6
        assert rel_err(first[n].A, both[n].A) <= 1e-6 and rel_err(first[n].G, both[n].G) <= 1e-6


def test_operator_products_use_kronecker_structure():
    model = with_lora(tiny_llama())
    kfac = KFAC(model).fit([make_batch()])
    v = {n: torch.randn(s, dtype=torch.float64) for n, s in kfac.param_shapes.items()}
    mv = kfac.mv(v)
    back = kfac.inverse_mv(mv, damping=0.0 + 1e-12)
    for b in kfac.blocks:
        f = kfac.factors[b.name]
        V = v[b.weight_name]
        assert rel_err(mv[b.weight_name], f.G.double() @ V @ f.A.double()) <= 1e-5
    damped = kfac.inverse_mv(v, damping=0.5)
    again = kfac.mv(damped)
    for n in v:
        assert rel_err(again[n] + 0.5 * damped[n], v[n]) <= 1e-5
    assert set(back) == set(v)
    dense = kfac.to_scipy()
    x = torch.cat([t.reshape(-1) for t in v.values()]).numpy()
    assert rel_err(torch.as_tensor(dense.matvec(x)), torch.cat([t.reshape(-1) for t in mv.values()])) <= 1e-6


def test_bad_input_is_refused_and_changes_nothing():
    model = tiny_llama()
    kfac = KFAC(model).fit([make_batch()])
    before = {n: f.A.clone() for n, f in kfac.factors.items()}
    ignored = make_batch()
    ignored["labels"][:] = -100
    with pytest.raises(ValueError, match="every token is ignored"):
        kfac.fit([ignored])
    with pytest.raises(ValueError, match="no batches"):
        kfac.fit([])
    with pytest.raises(ValueError, match="input_ids"):
        kfac.fit([{"labels": torch.zeros(2, 3)}])
    for n, f in kfac.factors.items():
        assert torch.equal(f.A, before[n])
    v = {n: torch.zeros(s) for n, s in kfac.param_shapes.items()}
    bad_name = dict(v)
    bad_name["nope"] = bad_name.pop(next(iter(bad_name)))
    with pytest.raises(ValueError, match="names do not match"):
        kfac.mv(bad_name)
    bad_shape = dict(v)
    first = next(iter(bad_shape))
    bad_shape[first] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        kfac.inverse_mv(bad_shape, 1e-3)
    with pytest.raises(ValueError, match="damping"):
        kfac.inverse_mv(v, -1.0)
    with pytest.raises(RuntimeError, match="fit"):
        KFAC(model).mv(v)


def test_non_finite_gradient_names_the_module():
    model = tiny_llama(dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"layers\.\d"):
        KFAC(model).fit([make_batch()])


def test_kfac_state_dict_round_trip():
    model = tiny_llama()
    kfac = KFAC(model).fit([make_batch()])
    other = KFAC(model)
    other.load_state_dict(kfac.state_dict())
    v = {n: torch.randn(s, dtype=torch.float64) for n, s in kfac.param_shapes.items()}
    a, b = kfac.inverse_mv(v, 1e-2), other.inverse_mv(v, 1e-2)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("low", [None, LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2)])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_keep_factors_false_frees_each_factor_at_its_decomposition(cls, low, monkeypatch):
    """``keep_factors=False``: the same operator bit for bit; each factor dies as soon as it is decomposed (fewer
    factor tensors alive at each decomposition call than at the one before), so none is held afterwards, the q/k/v
    input factors decomposed once included; what needs the factors is refused."""
    model = with_lora(tiny_llama(), targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
    batches = [make_batch(pad=True, seed=s) for s in range(2)]
    kept = cls(model, low_rank=low).fit(batches)
    lean = cls(model, low_rank=low, keep_factors=False)
    held, decompose = [], lean._all_eigen

    def spy():  # weak references to every factor tensor, taken when the decomposition starts (EK-FAC: in its fit)
        held.extend(weakref.ref(t) for f in lean.factors.values() for side in (f.A, f.G)
                    for t in (side.held() if isinstance(side, SketchedFactor) else [side]))
        return decompose()

    alive = []  # factor tensors alive at each decomposition call

    def counted(fn):
        def call(*args, **kwargs):
            gc.collect()
            alive.append(sum(r() is not None for r in held))
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(eigen_module, "_eigh_chunk", counted(eigen_module._eigh_chunk))
    monkeypatch.setattr(SketchedFactor, "eigen", counted(SketchedFactor.eigen))
    lean._all_eigen = spy
    lean.fit(batches)
    lean.eigen(lean.blocks[0].name)
    gc.collect()
    assert held and not lean.factors and all(r() is None for r in held)
    assert len(alive) >= 2 and alive == sorted(alive, reverse=True) and alive[-1] < alive[0], alive
    v = {n: torch.randn(s, dtype=torch.float64) for n, s in kept.param_shapes.items()}
    for damping in (1e-3, 0.5):
        a, b = kept.inverse_mv(v, damping), lean.inverse_mv(v, damping)
        assert all(torch.equal(a[n], b[n]) for n in a)
    a, b = kept.mv(v), lean.mv(v)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert lean.curvature_bytes() < kept.curvature_bytes()
    with pytest.raises(ValueError, match="reset"):
        lean.fit(batches)
    with pytest.raises(ValueError, match="keep_factors=False"):
        lean.state_dict()
    lean.reset()
    lean.fit(batches)
    b = lean.inverse_mv(v, 0.5)
    a = kept.inverse_mv(v, 0.5)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="keep_factors=True"):
        KFAC(model, ema_decay=0.9, keep_factors=False)


def test_keep_factors_false_after_a_failed_decomposition_fits_anew():
    """A decomposition that fails (a non-finite factor) has consumed some factors: a next fit starts from nothing
    (no stale token counts) and equals a fresh fit."""
    model = with_lora(tiny_llama())
    batches = [make_batch(pad=True, seed=s) for s in range(2)]
    lean = KFAC(model, keep_factors=False).fit(batches[:1])
    lean.factors[lean.blocks[0].name].G[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        lean.eigen(lean.blocks[0].name)
    lean.fit(batches[1:])
    fresh = KFAC(model).fit(batches[1:])
    v = {n: torch.randn(s, dtype=torch.float64) for n, s in fresh.param_shapes.items()}
    a, b = fresh.inverse_mv(v, 0.1), lean.inverse_mv(v, 0.1)
    assert all(torch.equal(a[n], b[n]) for n in a)
