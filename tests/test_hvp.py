"""Exact Hessian / GGN / empirical-Fisher products against dense autograd oracles."""

import pytest
import torch
from conftest import TinyMLPLM, make_batch, random_vector, rel_err, tiny_llama, with_lora

from curvsafe.curvature import (CausalLMLoss, EmpiricalFisherOperator, GGNOperator, HessianOperator,
                                empirical_fisher_vp, ggn_vp, hvp, select_params)
from curvsafe.curvature.loss import curvature_mode
from curvsafe.nll import batch_nll_sums


def flat_loss_fn(model, batches, params):
    """The mean loss over batches as a function of the concatenated selected parameters."""
    from torch.func import functional_call

    names = list(params)
    shapes = [params[n].shape for n in names]
    loss = CausalLMLoss()

    def f(flat):
        tensors, offset = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            tensors[n] = flat[offset:offset + k].view(s)
            offset += k
        total = 0.0
        for b in batches:
            logits = functional_call(model, tensors, args=(), kwargs={"input_ids": b["input_ids"],
                                                                      "attention_mask": b["attention_mask"]}).logits
            targets = loss.targets(b)
            valid = loss.valid(targets) & b["attention_mask"].bool()
            total = total + loss.token_losses(logits, targets).masked_fill(~valid, 0).sum() / valid.sum()
        return total / len(batches)

    return f, torch.cat([params[n].detach().reshape(-1) for n in names])


def flat(v):
    return torch.cat([t.reshape(-1) for t in v.values()])


def dense_hessian(model, batches, params):
    f, x0 = flat_loss_fn(model, batches, params)
    with curvature_mode(model):
        return torch.autograd.functional.hessian(f, x0)


def test_hvp_tiny_mlp_exact():
    torch.manual_seed(0)
    model = TinyMLPLM().double()
    batches = [make_batch(seed=1), make_batch(seed=2, batch=2)]
    params = select_params(model)
    H = dense_hessian(model, batches, params)
    v = random_vector(params)
    for method in ("forward", "double_backward"):
        assert rel_err(flat(hvp(model, batches, v, method=method)), H @ flat(v)) <= 1e-10


def test_hvp_lora_llama_default_sdpa():
    """Default (sdpa) attention: the engine switches to the math backend itself. HF's LlamaRMSNorm computes in
    float32 even in a float64 model, which sets the 1e-6 floor."""
    model = with_lora(tiny_llama())
    assert model.config._attn_implementation == "sdpa"
    batches = [make_batch()]
    params = select_params(model)
    H = dense_hessian(model, batches, params)
    v = random_vector(params)
    assert rel_err(flat(hvp(model, batches, v)), H @ flat(v)) <= 1e-6
    assert model.training  # the caller's mode is restored


def per_example_jacobians(model, batch, params):
    """Rows: gradients of each sequence's sum loss, as a (B, P) matrix."""
    f_names = list(params)
    loss = CausalLMLoss()
    rows = []
    with curvature_mode(model):
        for i in range(batch["input_ids"].shape[0]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = loss.targets(batch)
            valid = loss.valid(targets) & batch["attention_mask"].bool()
            li = loss.token_losses(logits, targets).masked_fill(~valid, 0)[i].sum()
            grads = torch.autograd.grad(li, [params[n] for n in f_names])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows), int(valid.sum())


def test_empirical_fisher_vp_matches_per_example_gradients():
    model = with_lora(tiny_llama())
    batch = make_batch()
    params = select_params(model)
    J, count = per_example_jacobians(model, batch, params)
    v = random_vector(params)
    expected = J.T @ (J @ flat(v)) / count
    assert rel_err(flat(empirical_fisher_vp(model, [batch], v)), expected) <= 1e-6  # float32 RMSNorm floor


def test_ggn_vp_matches_dense_jacobian():
    torch.manual_seed(0)
    model = TinyMLPLM().double()
    batch = make_batch()
    params = select_params(model)
    names = list(params)
    loss = CausalLMLoss()
    x0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def logits_of(flat_params):
        from torch.func import functional_call

        tensors, offset = {}, 0
        for n in names:
            k = params[n].numel()
            tensors[n] = flat_params[offset:offset + k].view(params[n].shape)
            offset += k
        return functional_call(model, tensors, args=(batch["input_ids"],)).logits.reshape(-1)

    J = torch.autograd.functional.jacobian(logits_of, x0)  # (B*T*V, P)
    logits = logits_of(x0).view(*batch["input_ids"].shape, -1)
    targets = loss.targets(batch)
    valid = loss.valid(targets) & batch["attention_mask"].bool()
    p = torch.softmax(logits, -1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    H = H * valid[..., None, None]
    Hbig = torch.block_diag(*H.reshape(-1, H.shape[-1], H.shape[-1]))
    ggn = J.T @ Hbig @ J / valid.sum()
    v = random_vector(params)
    assert rel_err(flat(ggn_vp(model, [batch], v)), ggn @ flat(v)) <= 1e-10


def test_operators_share_the_interface():
    torch.manual_seed(0)
    model = TinyMLPLM().double()
    batches = [make_batch()]
    params = select_params(model)
    v = random_vector(params)
    H = dense_hessian(model, batches, params)
    for cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        op = cls(model, batches)
        assert set(op.mv(v)) == set(v)
    ggn = GGNOperator(model, batches, cg_tol=1e-10)
    x = ggn.inverse_mv(v, damping=0.1)
    back = ggn.mv(x)
    assert rel_err(flat(back) + 0.1 * flat(x), flat(v)) <= 1e-7
    hess = HessianOperator(model, batches).to_scipy()
    assert rel_err(torch.as_tensor(hess.matvec(flat(v).numpy())), H @ flat(v)) <= 1e-10


def test_bad_vectors_and_data():
    model = TinyMLPLM().double()
    params = select_params(model)
    v = random_vector(params)
    with pytest.raises(ValueError, match="names do not match"):
        hvp(model, [make_batch()], {k: t for k, t in list(v.items())[1:]})
    with pytest.raises(ValueError, match="no batches"):
        hvp(model, [], v)
    ignored = make_batch()
    ignored["labels"][:] = -100
    with pytest.raises(ValueError, match="every token ignored"):
        ggn_vp(model, [ignored], v)
    with pytest.raises(ValueError, match="matching no parameter: \\['missing.weight'\\]"):
        hvp(model, [make_batch()], v, params=["missing.weight"])
    with pytest.raises(ValueError, match="unknown parameter"):
        hvp(model, [make_batch()], v, params={"missing.weight": v["fc1.weight"]})


def test_params_are_names_or_globs_as_in_restore():
    """A list selects exact names and glob patterns (restore's ``params`` convention), in the list's order."""
    model = TinyMLPLM().double()
    assert list(select_params(model, ["fc2.bias", "fc1.*"])) == ["fc2.bias", "fc1.weight", "fc1.bias"]
    assert list(select_params(model, ["*.weight"])) == ["embed.weight", "fc1.weight", "fc2.weight"]
    assert list(select_params(model, "fc1.weight")) == ["fc1.weight"]
    with pytest.raises(ValueError, match=r"matching no parameter: \['fc3\.\*'\]"):
        select_params(model, ["fc1.weight", "fc3.*"])


@pytest.mark.parametrize("product", [hvp, ggn_vp, empirical_fisher_vp])
def test_products_in_row_chunks_equal_the_whole_batch(product):
    """``max_rows``: each batch in chunks of rows, weighted by their counted tokens, is the same product (a
    chunk with no counted token, here a row whose labels are all ignored, is skipped)."""
    model = with_lora(tiny_llama())
    batches = [make_batch(batch=5, seq=7, seed=1), make_batch(batch=3, seq=6, seed=2)]
    batches[0]["labels"][2] = -100  # a row with nothing counted
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    v = random_vector(named, seed=3)
    whole = product(model, batches, v, list(named))
    for rows in (1, 2):
        chunked = product(model, batches, v, list(named), max_rows=rows)
        for n in whole:
            assert rel_err(chunked[n], whole[n]) < 1e-6, (rows, n)  # HF's RMSNorm runs in float32 here
    with pytest.raises(ValueError, match="max_rows"):
        product(model, batches, v, list(named), max_rows=0)


@pytest.mark.parametrize("product", [hvp, ggn_vp, empirical_fisher_vp])
def test_products_over_merged_batches_equal_one_pass_per_batch(product):
    """``max_tokens``: consecutive batches of other lengths, right-padded into one pass, weight each counted token
    by 1/(K N_k) as the mean of batch means does: the same product with fewer forwards (with ``max_rows`` too:
    split first, then merged)."""
    model = with_lora(tiny_llama())
    batches = [make_batch(batch=3, seq=7, seed=1), make_batch(batch=1, seq=5, seed=2),
               make_batch(batch=4, seq=9, seed=4, prompt=6)]
    batches[0]["labels"][0] = -100  # a row with nothing counted
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    v = random_vector(named, seed=3)
    forwards = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: forwards.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)
    try:
        whole = product(model, batches, v, list(named))
        assert forwards == [(3, 7), (1, 5), (4, 9)]
        for max_rows, max_tokens, shapes in ((None, 35, [(4, 7), (4, 9)]), (None, 10 ** 6, [(8, 9)]),
                                             (2, 10 ** 6, [(2, 7), (2, 7), (2, 9), (2, 9)])):
            forwards.clear()
            merged = product(model, batches, v, list(named), max_rows=max_rows, max_tokens=max_tokens)
            assert forwards == shapes
            for n in whole:
                assert rel_err(merged[n], whole[n]) < 1e-6, (max_tokens, n)  # HF's RMSNorm runs in float32 here
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="max_tokens"):
        product(model, batches, v, list(named), max_tokens=0)


def _sharded_products(rank, port, out_dir):
    """2 gloo ranks, the tiny LoRA Llama sharded with FSDP2 (float64): the GGN product of each rank's batches,
    and the refusals of the products that need a double backward and of merged loss passes."""
    import os

    import torch.distributed as dist

    from curvsafe.curvature.sharded import shard_model
    from curvsafe.ranks import leave_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = shard_model(with_lora(tiny_llama()))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        v = random_vector({n: torch.empty(p.shape, dtype=torch.float64) for n, p in model.named_parameters()
                           if n in names}, seed=3)
        batches = [make_batch(batch=2, seq=8, seed=s) for s in range(4)][rank::2]
        result = {"ggn": ggn_vp(model, batches, v, names)}
        for product in (hvp, empirical_fisher_vp):
            try:
                product(model, batches, v, names)
            except ValueError as exc:
                result[product.__name__] = str(exc)
        try:  # merged loss passes (restore's loss_tokens) would run other numbers of forwards per rank
            next(batch_nll_sums(model, batches, grad=False, max_tokens=64))
        except ValueError as exc:
            result["merged_nll"] = str(exc)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        model = None  # freed before the group is left (a sharded model holds it)
    finally:
        leave_group()


def test_ggn_vp_on_an_fsdp2_sharded_model_equals_one_process(tmp_path):
    """FSDP2 frees each layer's whole weights after its backward, so the double-VJP ``J v`` cannot run there: the
    sharded GGN takes ``J v`` in forward mode (dual parameters) and one ordinary backward, and equals the
    single-process product on the union of the ranks' batches."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_sharded_products, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    model = with_lora(tiny_llama())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    v = random_vector({n: p for n, p in model.named_parameters() if n in names}, seed=3)
    want = ggn_vp(model, [make_batch(batch=2, seq=8, seed=s) for s in range(4)], v, names)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for n in names:
            assert rel_err(got["ggn"][n], want[n]) < 1e-10, n
        assert "double backward" in got["hvp"] and "double backward" in got["empirical_fisher_vp"]
        assert "FSDP2-sharded" in got["merged_nll"]


def test_curvature_mode_sets_flags_without_train_overrides_and_restores_each_module():
    """Every module in eval mode inside (no dropout), each module's own flag back after (a model in mixed modes
    stays mixed), and the model's ``train()`` / ``eval()`` overrides never run (transformers re-kernelizes in
    them when the ``kernels`` package is installed), also when the body raises."""
    calls = []

    class Overriding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)
            self.frozen = torch.nn.Linear(3, 3)
            self.lin = torch.nn.Linear(3, 3)

        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    model = Overriding()
    model.frozen.eval()  # a part the user keeps in eval mode
    calls.clear()
    before = {n: m.training for n, m in model.named_modules()}
    with curvature_mode(model):
        assert not any(m.training for m in model.modules())
        x = torch.ones(4, 3)
        assert torch.equal(model.drop(x), x)  # dropout off
    assert {n: m.training for n, m in model.named_modules()} == before
    with pytest.raises(RuntimeError, match="inside"):
        with curvature_mode(model):
            raise RuntimeError("inside")
    assert {n: m.training for n, m in model.named_modules()} == before
    assert calls == []
