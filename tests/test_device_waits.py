"""Where the curvature passes wait for the device: once per batch at most, never per block.

On a GPU every read of a value to the host (``.item()``, ``int(t)``, ``.tolist()``) and every op whose output size
depends on the data (``nonzero``, ``unique_consecutive``, a boolean index) blocks until the queued work is done.
A pass over many blocks that does this in each block's callback serialises host and device; one that reads a
batch's grouping once (:class:`~curvsafe.curvature.sequence_grads.Segments`) does not. The count is taken on CPU
with a dispatch mode that sees every such op (and ``tolist``, which CPU tensors serve without dispatching), and
compared between a fit over one block and one over every block: the same count means no block adds a wait.
Waits inside :mod:`curvsafe.kernels` are left out: its CPU paths check ``offsets`` (cheap there), its Triton path
takes them as they are (:func:`test_triton_fisher_diag_with_offsets_reads_nothing`). So is CurvSafe's guard solve,
which runs on the host by design (:mod:`curvsafe.optim.guard`).
"""

import traceback
import warnings
from collections import Counter

import pytest
import torch
from conftest import VOCAB, llama_config, make_batch, with_lora
from torch.utils._python_dispatch import TorchDispatchMode

from curvsafe.capture import find_blocks
from curvsafe.curvature import EKFAC, KFAC, BlockFisherOperator, empirical_fisher_diagonal
from curvsafe.curvature.lowrank import LowRank
from curvsafe.influence import per_example_gradients
from curvsafe.optim import CurvSafe

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.unique_consecutive.default,
         aten._unique2.default, aten.masked_select.default}


HOST_SIDE = {"guard_correction", "halfspace_multipliers"}  # CurvSafe's guard: one .cpu() read, then host tensors


def _left_out() -> bool:
    """Whether the op runs inside :mod:`curvsafe.kernels`, or inside CurvSafe's guard, which reads its step's
    ``<u, g_i>`` to the host once and solves there (on CPU the count sees neither that read nor a difference
    between host and device tensors)."""
    return any("/kernels/" in f.filename or f.name in HOST_SIDE for f in traceback.extract_stack())


class Waits(TorchDispatchMode):
    """Counts the ops that wait for the device (module docstring), by op; outside the kernels and the guard unless
    ``everywhere``."""

    def __init__(self, everywhere: bool = False):
        super().__init__()
        self.count = Counter()
        self.everywhere = everywhere

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        unsized = func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if (func in READS or boolean_index or unsized) and (self.everywhere or not _left_out()):
            self.count[str(func)] += 1
        return func(*args, **kwargs)


def count_waits(fn, monkeypatch) -> Counter:
    """The waits of ``fn()`` by op (``tolist`` counted by name)."""
    waits = Waits()
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        if not _left_out():
            waits.count["tolist"] += 1
        return tolist(t)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", counted_tolist)
        with waits:
            fn()
    return waits.count


def llama(layers):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return with_lora(LlamaForCausalLM(llama_config(num_hidden_layers=layers)).double())


def qwen2(layers):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64, pad_token_id=0)).double()


BATCHES = [make_batch(seed=0), make_batch(seq=12, seed=1)]  # a padded row, then sequences long enough to prefer
# the per-sequence order for LoRA blocks (EK-FAC's one-pass fit)

CASES = {
    "ekfac one pass": (llama, lambda m: EKFAC(m, modules="lora").fit(BATCHES)),
    "ekfac two passes": (llama, lambda m: EKFAC(m, modules="lora", max_gradient_bytes=0).fit(BATCHES)),
    "kfac reduce": (llama, lambda m: KFAC(m, modules="lora", kfac_approx="reduce").fit(BATCHES)),
    "kfac sketched, reduce": (qwen2, lambda m: KFAC(m, kfac_approx="reduce",
                                                    low_rank=LowRank(max_dense_dim=8, rank=4)).fit(BATCHES)),
    "fisher diagonal (biases)": (qwen2, lambda m: empirical_fisher_diagonal(m, BATCHES)),
    "per-example gradients": (llama, lambda m: per_example_gradients(m, find_blocks(m, "lora"), BATCHES)),
    "block Fisher product": (qwen2, lambda m: BlockFisherOperator(m, BATCHES).mv(
        {n: torch.ones_like(p) for n, p in m.named_parameters() if n.endswith("proj.weight")})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_block_adds_a_wait_for_the_device(case, monkeypatch):
    """The same model with one decoder layer and with three (three times the blocks, the same shapes): the same
    waits. Before the batch's grouping was read once, EK-FAC's correction and the reduce approximation waited
    several times per block and batch, the eigendecomposition twice per factor and the hooks' check twice per
    block."""
    make_model, run = CASES[case]
    waits = [count_waits(lambda: run(make_model(layers)), monkeypatch) for layers in (1, 3)]
    assert waits[0] == waits[1], waits
    assert sum(waits[0].values()) > 0  # the counter sees the per-batch reads (the batch's lengths among them)


def test_no_block_adds_a_wait_to_a_curvsafe_step(monkeypatch):
    """CurvSafe's guarded recipe (benign side, screening, rescale) around SGD (which reads nothing itself): its
    steps between refreshes wait as often with 3 decoder layers as with 1 (the screen scores and removes examples
    shape by shape, the projection runs in stacked groups, the guard reads one value per constraint), and once per
    step besides the guard's read (the screen's counts and checks)."""
    def steps(layers):
        model = llama(layers)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = CurvSafe(torch.optim.SGD(params, lr=1e-2), model, [make_batch(seed=10), make_batch(seed=11)],
                       benign_batches=[make_batch(seed=20)], screen=0.05, rescale=2.0, refresh_tol=None)
        batches = [make_batch(seed=s) for s in range(4)]
        for i, batch in enumerate(batches):
            opt.zero_grad()
            model(**batch).loss.backward()
            if i == 0:  # the first step refreshes: the ones after it do not (no tolerance, every 50 steps)
                opt.step()
            else:
                waits.append(count_waits(opt.step, monkeypatch))
        assert opt.refresh_count == 1

    waits = []
    steps(1)
    one = sum(waits, Counter())
    waits = []
    steps(3)
    assert one == sum(waits, Counter()), (one, sum(waits, Counter()))
    assert one == Counter(tolist=3), one  # per step, the screen's one read (the guard's is left out: see above)


def test_a_screened_step_waits_once(monkeypatch):
    """Example screening over two micro-batches (two passes) with rows screened: one read of the device for the
    whole step (the counts and the checks' sums together), none per pass or per shape; the cosines stay on the
    device until read."""
    from curvsafe.optim.screen import ExampleScreen

    model = llama(1)
    model.train()
    blocks = find_blocks(model)
    named = dict(model.named_parameters())
    params = {n: named[n] for b in blocks for n in b.param_names}
    screen = ExampleScreen(model, blocks, threshold=0.0)
    for seed in (1, 2):
        model(**make_batch(batch=3, seed=seed)).loss.backward()
    batch_grad = {n: p.grad.clone() for n, p in params.items()}  # safety: its negative (the rows along it push against)
    waits = count_waits(lambda: screen.apply(params, {n: -g for n, g in batch_grad.items()}), monkeypatch)
    assert waits == Counter(tolist=1), waits
    assert screen.cosines.shape == (6,) and (screen.cosines > 0).sum() >= 1


def test_triton_fisher_diag_with_offsets_reads_nothing():
    """The Triton launcher given offsets passes them to the kernel as they are: no op that waits for the device
    (on CPU the interpreter runs it; the launcher's own torch ops are what the count sees)."""
    from curvsafe.kernels import fisher_diag
    from curvsafe.kernels._triton import HAS_TRITON, INTERPRET

    if not (HAS_TRITON and (INTERPRET or torch.cuda.is_available())):
        pytest.skip("Triton is not available here")
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, gy = torch.randn(9, 33, generator=g).to(device), torch.randn(9, 35, generator=g).to(device)
    offsets = torch.tensor([0, 4, 4, 9], device=device)
    waits = Waits(everywhere=True)
    with waits:
        got = fisher_diag._fisher_diag_triton(x, gy, None, offsets)
    assert not waits.count
    with waits:  # the count sees the launcher's ops: given sorted ids instead, it finds their bounds
        fisher_diag._fisher_diag_triton(x, gy, torch.tensor([0] * 4 + [2] * 5, device=device), None)
    assert waits.count["aten.unique_consecutive.default"] == 1
    assert torch.allclose(got, fisher_diag.reference.linear_fisher_diag(x, gy, offsets=offsets), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts the GPU's own synchronisations")
@pytest.mark.parametrize("case", ["ekfac one pass", "ekfac two passes", "kfac reduce", "fisher diagonal (biases)"])
def test_no_block_adds_a_synchronisation_on_the_gpu(case):
    """The same on a GPU, counted by CUDA's own sync debug mode (a warning per synchronising call) instead of by
    op: the device's waits of a pass with 1 and with 3 decoder layers."""
    make_model, run = CASES[case]
    counts = []
    for layers in (1, 3):
        model = make_model(layers).cuda()
        run(model)  # warm-up: lazy initialisation synchronises once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(model)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts
