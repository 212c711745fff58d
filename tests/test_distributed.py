"""Two gloo processes on 127.0.0.1: all-reduced statistics equal one process on the union of the data."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_batch, rel_err, tiny_llama, with_lora

from curvsafe.curvature import EKFAC, KFAC, empirical_fisher_vp
from curvsafe.curvature.lowrank import LowRank, SketchedFactor
from curvsafe.ranks import leave_group


def batches_for(rank=None):
    """Four batches of unequal padding; rank r gets batches r and r + 2."""
    data = [make_batch(seed=s, pad=s % 2 == 0) for s in range(4)]
    return data if rank is None else data[rank::2]


def compute(rank=None):
    model = with_lora(tiny_llama())
    data = batches_for(rank)
    kfac = KFAC(model, kfac_approx="expand").fit(data)
    reduce = KFAC(model, kfac_approx="reduce").fit(data)
    ekfac = EKFAC(model).fit(data)  # one pass on every rank
    # rank 0 cannot keep gradients: every rank takes the second pass with it (else the ranks' collectives differ)
    mixed = EKFAC(model, max_gradient_bytes=0 if rank == 0 else 1 << 28).fit(data)
    assert (ekfac.passes, mixed.passes) == (1, 1 if rank is None else 2)
    v = {n: torch.ones(s, dtype=torch.float64) for n, s in kfac.param_shapes.items()}
    low = LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2, passes=2)  # sketches refined by a second pass
    refined = {approx: {f"{n}.{side}": (getattr(f, side).Y, getattr(f, side).omega)
                        for n, f in KFAC(model, kfac_approx=approx, low_rank=low).fit(data).factors.items()
                        for side in ("A", "G") if isinstance(getattr(f, side), SketchedFactor)}
               for approx in ("expand", "reduce")}
    assert refined["expand"] and refined["reduce"]
    lean = KFAC(model, kfac_approx="expand", keep_factors=False).fit(data)  # all-reduced in place, no per-rank sums
    assert lean._sums is None
    return {"lean": lean.inverse_mv(v, 0.1), "kept": kfac.inverse_mv(v, 0.1),
            "refined": {f"{a}.{k}.{i}": t[i] for a, r in refined.items() for k, t in r.items() for i in (0, 1)},
            "A": {n: f.A for n, f in kfac.factors.items()}, "G": {n: f.G for n, f in kfac.factors.items()},
            "G_reduce": {n: f.G for n, f in reduce.factors.items()},
            "A_reduce": {n: f.A for n, f in reduce.factors.items()},
            "corrected": ekfac.corrected, "corrected_mixed": mixed.corrected,
            "efvp": empirical_fisher_vp(model, data, v)}


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(compute(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_on_the_union(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = compute()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("A", "G", "A_reduce", "G_reduce", "corrected", "corrected_mixed", "efvp", "refined", "lean"):
        for name, expected in single[key].items():
            for r in ranks:
                assert rel_err(r[key][name], expected) <= 1e-5, (key, name)
    for r in [single, *ranks]:
        assert all(torch.equal(r["lean"][n], r["kept"][n]) for n in r["kept"])


def gather_worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from curvsafe.curvature.sharded import gather_whole, local_part

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        g = torch.Generator().manual_seed(0)
        wholes = [torch.randn(shape, generator=g) for shape in ((5, 3), (1, 4), (7,), (2, 2, 3))]
        params = [distribute_tensor(w, mesh, [Shard(0)]) for w in wholes]  # uneven: 3 + 2 rows, 1 + 0, ...
        gathered = gather_whole(params, [2 * p.to_local() for p in params])
        parts = [local_part(p, w) for p, w in zip(params, wholes)]
        torch.save({"gathered": gathered, "parts_match": [torch.equal(a, p.to_local()) for a, p in zip(parts, params)]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_group()


def test_whole_tensors_gathered_from_uneven_shards_in_one_collective(tmp_path):
    mp.spawn(gather_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    wholes = [torch.randn(shape, generator=g) for shape in ((5, 3), (1, 4), (7,), (2, 2, 3))]
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt")
        assert all(result["parts_match"])
        for got, want in zip(result["gathered"], wholes):
            assert torch.equal(got, 2 * want)
