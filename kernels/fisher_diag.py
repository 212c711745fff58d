"""Op 3: ``linear_fisher_diag`` -- diagonal empirical Fisher of one linear layer from per-example gradients."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import reference
from ._dispatch import check_matrix, check_same_device, check_segments, choose_backend


def linear_fisher_diag(x: Tensor, gy: Tensor, *, segment_ids: Optional[Tensor] = None,
                       backend: Optional[str] = None) -> Tensor:
    """Return ``sum_n g_n * g_n`` (d_out, d_in) fp32 with ``g_n = sum_{t in segment n} gy_t x_t^T``.

    Per-example gradients are never all materialised. ``segment_ids=None`` makes each token its own example.
    """
    check_matrix("x", x)
    check_matrix("gy", gy, rows=x.shape[0])
    check_segments(segment_ids, x.shape[0])
    device = check_same_device(x, gy, segment_ids)
    chosen = choose_backend(backend, device)
    if chosen == "cpp":
        from ._cpp import load_extension

        seg = None if segment_ids is None else segment_ids.long().contiguous()
        return load_extension().linear_fisher_diag(x.float().contiguous(), gy.float().contiguous(), seg)
    return reference.linear_fisher_diag(x, gy, segment_ids=segment_ids)
