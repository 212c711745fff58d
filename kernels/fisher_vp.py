"""Op 2: ``linear_fisher_vp`` -- exact empirical-Fisher-vector product of one linear layer."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import reference
from ._dispatch import check_matrix, check_same_device, check_segments, choose_backend


def linear_fisher_vp(x: Tensor, gy: Tensor, V: Tensor, *, segment_ids: Optional[Tensor] = None,
                     num_segments: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """Return ``sum_n g_n <g_n, V>`` (d_out, d_in) fp32 with ``g_n = sum_{t in segment n} gy_t x_t^T``.

    Never materialises per-example gradients: ``s_t = gy_t . (V x_t)``, segment sums ``c_n``, then
    ``gy^T diag(c_{n(t)}) x``. ``segment_ids=None`` makes each token its own example.
    """
    check_matrix("x", x)
    check_matrix("gy", gy, rows=x.shape[0])
    check_matrix("V", V, rows=gy.shape[1], cols=x.shape[1])
    check_segments(segment_ids, x.shape[0])
    device = check_same_device(x, gy, V, segment_ids)
    chosen = choose_backend(backend, device)
    if chosen == "cpp":
        from ._cpp import load_extension

        seg = None if segment_ids is None else segment_ids.long().contiguous()
        return load_extension().linear_fisher_vp(x.float().contiguous(), gy.float().contiguous(),
                                                 V.float().contiguous(), seg, -1 if num_segments is None else num_segments)
    return reference.linear_fisher_vp(x, gy, V, segment_ids=segment_ids, num_segments=num_segments)
