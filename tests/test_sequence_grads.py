"""EK-FAC's rotated per-sequence gradient squares in both orders, and the one-pass EK-FAC fit against two passes."""

import pytest
import torch
from conftest import make_batch, rel_err, tiny_llama, tiny_qwen2, with_lora

from curvsafe.curvature import EKFAC
from curvsafe.curvature import sequence_grads as sg


def reference(a, g, QA, QG, segment_ids):
    """sum_n (QG^T grad_n QA)^2, one sequence at a time."""
    out = torch.zeros(QG.shape[1], QA.shape[1], dtype=torch.float64)
    for n in segment_ids.unique():
        rows = segment_ids == n
        grad = g[rows].double().T @ a[rows].double()
        out += (QG.double().T @ grad @ QA.double()).square()
    return out


def of_ids(segment_ids, rows=None):
    """The grouping of tokens with sorted row ids (``rows``: default the largest id + 1)."""
    return sg.Segments.from_lengths(torch.bincount(segment_ids, minlength=rows or int(segment_ids.max()) + 1))


def orthonormal(d, k, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q[:, :k].contiguous()


@pytest.mark.parametrize("d_in,d_out,k_in,k_out", [(40, 3, 40, 3), (3, 37, 3, 37), (33, 29, 33, 29), (40, 3, 9, 3)])
@pytest.mark.parametrize("chunk_bytes", [1 << 25, 1])  # all sequences at once, or one at a time
def test_rotated_fisher_diag_both_orders_equal_the_per_sequence_sum(monkeypatch, d_in, d_out, k_in, k_out,
                                                                     chunk_bytes):
    """LoRA-like narrow blocks, a wide one and a truncated basis; uneven sequences with a gap in the row ids (a
    fully padded row): forced into each order, the sum is the one-sequence-at-a-time reference."""
    monkeypatch.setattr(sg, "_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    segment_ids = torch.tensor([0] * 9 + [1] * 2 + [3] * 14 + [4])
    a = torch.randn(len(segment_ids), d_in, generator=g)
    gy = torch.randn(len(segment_ids), d_out, generator=g)
    QA, QG = orthonormal(d_in, k_in, 1), orthonormal(d_out, k_out, 2)
    expected = reference(a, gy, QA, QG, segment_ids)
    for prefer in (True, False):
        monkeypatch.setattr(sg, "prefer_sequences", lambda *args, p=prefer: p)
        got = sg.rotated_fisher_diag(a, gy, QA, QG, of_ids(segment_ids))
        assert got.dtype == torch.float32 and got.shape == (k_out, k_in)
        assert rel_err(got, expected) <= 1e-5, prefer


def test_prefer_sequences_picks_the_narrow_side_and_long_sequences():
    assert sg.prefer_sequences(4096, 32, 4096, 16, 4096, 16)  # a LoRA A matrix, sequences of 128 tokens
    assert sg.prefer_sequences(4096, 32, 16, 4096, 16, 4096)  # a LoRA B matrix
    assert not sg.prefer_sequences(4096, 32, 4096, 4096, 4096, 4096)  # a wide layer
    assert not sg.prefer_sequences(4096, 1024, 4096, 16, 4096, 16)  # 4-token sequences: rank 16 is not narrow


def fits(make_model, batches, **kw):
    one = EKFAC(make_model(), **kw).fit(batches)
    two = EKFAC(make_model(), max_gradient_bytes=0, **kw).fit(batches)
    return one, two


@pytest.mark.parametrize("case", ["lora", "qwen2-bias"])
def test_one_pass_equals_two_passes(case):
    """LoRA blocks of a Llama (padded rows) and the biased linear layers of a Qwen2 on 40-token sequences (long
    enough for the per-sequence order to be the cheaper): the factors' pass's own gradients give the second
    pass's corrected eigenvalues."""
    if case == "lora":
        make_model, batches = lambda: with_lora(tiny_llama()), [make_batch(seed=s) for s in range(3)]
    else:
        make_model, batches = lambda: tiny_qwen2(), [make_batch(seq=40, seed=s) for s in range(2)]
    one, two = fits(make_model, batches)
    assert (one.passes, two.passes) == (1, 2)
    assert set(one.corrected) == set(two.corrected)
    for n in two.corrected:
        assert rel_err(one.corrected[n], two.corrected[n]) <= 1e-6, n
    assert (case == "qwen2-bias") == bool(two.corrected_bias)
    for n in two.corrected_bias:
        assert rel_err(one.corrected_bias[n], two.corrected_bias[n]) <= 1e-6, n


def test_one_pass_with_sampled_targets_uses_the_factors_samples(monkeypatch):
    """MC Fisher: one pass corrects with the targets that the factors were fitted on, i.e. it equals two passes
    whose second draws the same targets again."""
    batches = [make_batch(seed=s) for s in range(2)]
    one = EKFAC(with_lora(tiny_llama()), fisher_type="mc", seed=3).fit(batches)
    two = EKFAC(with_lora(tiny_llama()), fisher_type="mc", seed=3, max_gradient_bytes=0)
    monkeypatch.setattr(two, "_make_generator", lambda: torch.Generator().manual_seed(3))
    two.fit(batches)
    assert (one.passes, two.passes) == (1, 2)
    for n in two.corrected:
        assert rel_err(one.corrected[n], two.corrected[n]) <= 1e-6, n


def test_two_passes_when_gradients_exceed_the_budget_or_cost_more():
    batches = [make_batch(seed=s) for s in range(2)]
    model = with_lora(tiny_llama())
    rows, params = 6, sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert EKFAC(model, max_gradient_bytes=4 * rows * params).fit(batches).passes == 1
    assert EKFAC(model, max_gradient_bytes=4 * rows * params - 1).fit(batches).passes == 2
    assert EKFAC(tiny_llama()).fit(batches).passes == 2  # wide 16 x 16 layers, 7-token sequences: tokens cheaper
    with pytest.raises(ValueError, match="max_gradient_bytes"):
        EKFAC(model, max_gradient_bytes=-1)


def test_sequence_gradients_of_every_row_keep_empty_rows_as_zeros():
    """One gradient per batch row in row order, zeros for rows without tokens (influence scores index examples by
    row); ``with_tokens`` keeps the rows that have some."""
    g = torch.Generator().manual_seed(0)
    segments = of_ids(torch.tensor([0, 0, 0, 2, 2]), rows=4)
    a, gy = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    per_row = sg.sequence_gradients(a, gy, segments)
    assert per_row.shape == (4, 3, 4)
    assert torch.allclose(per_row[0], gy[:3].T @ a[:3]) and torch.allclose(per_row[2], gy[3:].T @ a[3:])
    assert not per_row[1].any() and not per_row[3].any()
    assert torch.equal(segments.with_tokens(per_row), per_row[[0, 2]])
    assert torch.allclose(sg.sequence_sums(gy, segments), torch.stack([gy[:3].sum(0), torch.zeros(3), gy[3:].sum(0),
                                                                       torch.zeros(3)]))


def test_segments_from_a_mask_and_their_row_ranges():
    """The grouping of a padded batch (an empty row, left and right padding): lengths, ids, positions, offsets and
    kept rows, and a range of rows renumbered from 0 with its token span."""
    lengths = torch.tensor([3, 0, 2, 4])
    seg = sg.Segments.from_lengths(lengths)
    assert (seg.rows, seg.tokens, seg.sequences, seg.max_length) == (4, 9, 3, 4)
    assert seg.ids.tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
    assert seg.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert seg.offsets.tolist() == [0, 3, 3, 5, 9] and seg.kept.tolist() == [0, 2, 3]
    lo, hi, part = seg.row_range(1, 3)
    assert (lo, hi, part.lengths) == (3, 5, (0, 2))
    assert part.ids.tolist() == [1, 1] and part.positions.tolist() == [0, 1] and part.offsets.tolist() == [0, 0, 2]
    assert part.kept.tolist() == [1]
    lo, hi, part = seg.row_range(2, 4)
    assert (lo, hi, part.kept) == (3, 9, None)
    assert sg.Segments.from_lengths(torch.tensor([2, 1])).kept is None
    empty = sg.Segments.empty()
    assert (empty.rows, empty.tokens, empty.max_length, empty.offsets.tolist()) == (0, 0, 0, [0])
