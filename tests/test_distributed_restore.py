"""``curvsafe restore`` on two gloo ranks (and three; processes launched as ``torchrun`` would: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): the same steps and adapter as one process on the union of the data, the same failure
on every rank for bad input, and no output when a rank dies mid-run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err, restore_files, write_jsonl
from safetensors.torch import load_file
from test_distributed import free_port
from test_faults import DRIVER, restore_cmd

from curvsafe.ranks import leave_group, map_sharded, shard


def launch(point_actions, args, timeout=600):
    """One process per (POINT, ACTION) of the fault driver, as the ranks of one run; their CompletedProcess-like
    results (returncode, stdout, stderr), in rank order."""
    env = {**os.environ, "WORLD_SIZE": str(len(point_actions)), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(DRIVER), point, action, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r, (point, action) in enumerate(point_actions)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("curvsafe restore") and ": error:" in line]


@pytest.fixture(scope="module")
def benign_file(setup):
    from curvsafe.data import Pair
    from curvsafe.testbed.corpus import World

    path = setup / "benign.jsonl"
    write_jsonl(path, [Pair(e.prompt, "") for e in World(0).benign_requests("eval")[:10]])
    return path


@pytest.mark.parametrize("method", ["lbfgs", "sgd"])
def test_two_ranks_take_the_steps_of_one_process_on_the_union(setup, benign_file, tmp_path, method):
    single = restore_files(setup, tmp_path / "single", method=method, iterations=3, batch_size=4, max_length=64,
                           benign_file=benign_file)
    cmd = ["restore", "--model", str(setup / "aligned"), "--adapter", str(setup / "adapter"), "--harmful",
           str(setup / "harmful.jsonl"), "--task", str(setup / "task.jsonl"), "--benign", str(benign_file),
           "--out", str(tmp_path / "ranks"), "--method", method, "--iterations", "3", "--batch-size", "4",
           "--max-length", "64"]
    ranks = launch([("none", "none")] * 2, cmd)
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    assert "wrote" in ranks[0][1] and ranks[1][1] == ""  # rank 0 alone prints and writes
    # to float32 rounding (1 thread vs 2; the loss passes merge each rank's batches, not the union's, which L-BFGS
    # amplifies over its 3 steps: 1.5e-5 in the adapter measured)
    report = assert_same_run(tmp_path / "ranks", tmp_path / "single", adapter_tol=1e-5 if method == "sgd" else 5e-5)
    assert report["ranks"] == 2 and single.report["ranks"] == 1


def assert_same_run(folder, expected_folder, adapter_tol=1e-5) -> dict:
    """Two restore outputs took the same steps: accepted steps and stop reason, levels to 1e-5, the aligned
    answers and over-refusal, adapters within ``adapter_tol`` (float32 rounding apart). Returns the first report."""
    report, expected = (json.loads((f / "report.json").read_text()) for f in (folder, expected_folder))
    assert report["iterations"] == expected["iterations"] >= 1
    assert report["stopped"] == expected["stopped"]
    for key in ("safety_objective", "task_nll", "benign_nll"):
        for when in ("before", "after"):
            assert report[key][when] == pytest.approx(expected[key][when], rel=1e-5), (key, when)
    assert report["over_refusal"] == expected["over_refusal"]
    assert (folder / "anchor.jsonl").read_text() == (expected_folder / "anchor.jsonl").read_text()
    got, want = (load_file(f / "adapter" / "adapter_model.safetensors") for f in (folder, expected_folder))
    assert got.keys() == want.keys()
    assert rel_err(*[torch.cat([t[n].flatten() for n in sorted(want)]) for t in (got, want)]) <= adapter_tol
    return report


@pytest.mark.parametrize("method, limit, iterations", [("kfac", 8, 3), ("sgd", 9, 3), ("lbfgs", 8, 1)])
def test_fsdp2_sharded_restore_takes_the_steps_of_the_unsharded_run(setup, benign_file, tmp_path, method, limit,
                                                                    iterations):
    """``--fsdp2``: each rank holds half of every weight; the run (the aligned answers generated with synced
    decoding, the gradients, the K-FAC fits, the steps, the adapter gathered whole for rank 0 to save) equals the
    unsharded two-rank run (kfac, lbfgs: 2 batches per file, so both runs deal the same batches; kfac draws the
    same Monte Carlo labels per rank; lbfgs's GGN products take ``J v`` in forward mode when sharded) and, but for
    kfac, one process on the union (sgd: 9 examples, 3 batches; sharded, the largest is split so that each rank
    runs 2 forwards per pass: the token means are unchanged, while curvature averaged per batch, as lbfgs's GGN,
    would weigh the halves as two batches). lbfgs runs one step: its first steps agree to 2e-8 (the GGN in
    forward mode, in float32), but L-BFGS amplifies float32 rounding over later steps (here 1.6e-5 in the
    second step's predicted change and 4e-3 in the third's, for 1e-7 differences in its products)."""
    cmd = ["restore", "--model", str(setup / "aligned"), "--adapter", str(setup / "adapter"), "--harmful",
           str(setup / "harmful.jsonl"), "--task", str(setup / "task.jsonl"), "--benign", str(benign_file),
           "--method", method, "--iterations", str(iterations), "--batch-size", "4", "--max-length", "64",
           "--limit", str(limit)]
    for name, extra in (("sharded", ["--fsdp2"]), ("replicated", [])):
        ranks = launch([("none", "none")] * 2, [*cmd, "--out", str(tmp_path / name), *extra])
        assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    sharded = assert_same_run(tmp_path / "sharded", tmp_path / "replicated")
    replicated = json.loads((tmp_path / "replicated" / "report.json").read_text())
    assert sharded["config"]["fsdp2"] and not replicated["config"]["fsdp2"]
    assert sharded["plan"]["peak_bytes"] != replicated["plan"]["peak_bytes"]  # per rank (test_plan.py: the sums)
    if method != "kfac":
        restore_files(setup, tmp_path / "single", method=method, iterations=iterations, batch_size=4, max_length=64,
                      benign_file=benign_file, limit=limit)
        assert_same_run(tmp_path / "sharded", tmp_path / "single")



def test_three_sharded_ranks_take_the_steps_of_one_process(setup, benign_file, tmp_path):
    """Nothing assumes two ranks: ``--fsdp2`` over 3 ranks (uneven row chunks of every weight; 3 batches per file,
    one per rank) takes the steps of one process on the union."""
    cmd = ["restore", "--model", str(setup / "aligned"), "--adapter", str(setup / "adapter"), "--harmful",
           str(setup / "harmful.jsonl"), "--task", str(setup / "task.jsonl"), "--benign", str(benign_file),
           "--method", "sgd", "--iterations", "3", "--batch-size", "4", "--max-length", "64", "--limit", "12",
           "--out", str(tmp_path / "sharded"), "--fsdp2"]
    ranks = launch([("none", "none")] * 3, cmd)
    assert [code for code, _, _ in ranks] == [0, 0, 0], "".join(err[-2000:] for _, _, err in ranks)
    restore_files(setup, tmp_path / "single", method="sgd", iterations=3, batch_size=4, max_length=64,
                  benign_file=benign_file, limit=12)
    assert assert_same_run(tmp_path / "sharded", tmp_path / "single")["ranks"] == 3


def test_hsdp_copies_sharded_over_part_of_the_ranks_take_the_steps_of_one_process(setup, benign_file, tmp_path):
    """``--fsdp2 --shards 2`` over 4 ranks: two copies of the model, each sharded over 2 ranks (a 2-D mesh; every
    rank reads its rows of the checkpoint by its shard coordinate), takes one process's steps on the union."""
    cmd = ["restore", "--model", str(setup / "aligned"), "--adapter", str(setup / "adapter"), "--harmful",
           str(setup / "harmful.jsonl"), "--task", str(setup / "task.jsonl"), "--benign", str(benign_file),
           "--method", "sgd", "--iterations", "3", "--batch-size", "2", "--max-length", "64", "--limit", "8",
           "--out", str(tmp_path / "hsdp"), "--fsdp2", "--shards", "2"]
    ranks = launch([("none", "none")] * 4, cmd)
    assert [code for code, _, _ in ranks] == [0] * 4, "".join(err[-2000:] for _, _, err in ranks)
    restore_files(setup, tmp_path / "single", method="sgd", iterations=3, batch_size=2, max_length=64,
                  benign_file=benign_file, limit=8)
    report = assert_same_run(tmp_path / "hsdp", tmp_path / "single")
    assert report["ranks"] == 4 and report["config"]["shards"] == 2


def test_fsdp2_in_bfloat16_keeps_a_float32_adapter_and_takes_the_unsharded_steps(setup, benign_file, tmp_path):
    """``--dtype bfloat16 --fsdp2``: the base weights sharded in bf16, the adapter in float32 (PEFT's own cast,
    kept shard by shard), so the restore's small steps are not rounded to bf16; the run equals the unsharded
    2-rank run in bf16."""
    from safetensors.torch import load_file

    cmd = ["restore", "--model", str(setup / "aligned"), "--adapter", str(setup / "adapter"), "--harmful",
           str(setup / "harmful.jsonl"), "--task", str(setup / "task.jsonl"), "--benign", str(benign_file),
           "--method", "kfac", "--iterations", "3", "--batch-size", "4", "--max-length", "64", "--limit", "8",
           "--dtype", "bfloat16"]
    for name, extra in (("sharded", ["--fsdp2"]), ("replicated", [])):
        ranks = launch([("none", "none")] * 2, [*cmd, "--out", str(tmp_path / name), *extra])
        assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    assert_same_run(tmp_path / "sharded", tmp_path / "replicated")
    adapter = load_file(tmp_path / "sharded" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}

def test_fsdp2_refuses_what_does_not_run_sharded(setup, tmp_path):
    for extra, message in ((["--method", "revert"], "revert (a baseline) does not run sharded"),
                           (["--method", "lbfgs", "--ggn-rows", "2"], "--ggn-rows does not run with --fsdp2"),
                           (["--shards", "3"], "--shards 3 does not divide the 2 ranks")):
        ranks = launch([("none", "none")] * 2, restore_cmd(setup, tmp_path / "out", "--fsdp2", *extra))
        assert [code for code, _, _ in ranks] == [2, 2]
        for _, _, err in ranks:
            found = errors(err)
            assert len(found) == 1 and message in found[0], err[-2000:]
    # without a launcher there is nothing to shard over
    with pytest.raises(ValueError, match="this process is alone"):
        restore_files(setup, tmp_path / "alone", method="kfac", fsdp2=True)
    with pytest.raises(ValueError, match="shards .HSDP. needs fsdp2"):
        restore_files(setup, tmp_path / "alone", method="kfac", shards=2)
    assert not (tmp_path / "out").exists() and not (tmp_path / "alone").exists()


def test_bad_input_fails_every_rank_alike(setup, tmp_path):
    (tmp_path / "taken").mkdir()  # an existing --out: rank 0 finds it, both ranks fail with its message
    ranks = launch([("none", "none")] * 2, restore_cmd(setup, tmp_path / "taken"))
    assert [code for code, _, _ in ranks] == [2, 2]
    lines = [errors(err) for _, _, err in ranks]
    assert all(len(found) == 1 and "exists; pass --force" in found[0] for found in lines), lines
    assert "[rank 1/2]" in lines[1][0] and "rank 0 of 2: FileExistsError" in lines[1][0]

    # too little data to give every rank a batch: every rank computes the same refusal from the same files
    ranks = launch([("none", "none")] * 2, restore_cmd(setup, tmp_path / "small", "--limit", "4",
                                                        "--batch-size", "8"))
    assert [code for code, _, _ in ranks] == [2, 2]
    for _, _, err in ranks:
        found = errors(err)
        assert len(found) == 1 and "batches of task data: 1 for 2 ranks" in found[0], err[-2000:]
    assert not (tmp_path / "small").exists()


def test_a_rank_that_dies_mid_run_leaves_no_output(setup, tmp_path):
    out = tmp_path / "out"
    ranks = launch([("none", "none"), ("step", "exit")], restore_cmd(setup, out, "--batch-size", "4"))
    assert ranks[1][0] == 1  # died after its first accepted step
    assert ranks[0][0] == 2, ranks[0][2][-3000:]  # rank 0's next collective fails: an error, nothing written
    assert len(errors(ranks[0][2])) == 1, ranks[0][2][-3000:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def _sharded_decoding(rank, port, out_dir):
    """Rank 0 decodes 3 prompts in batches of 1, rank 1 none: rank 1 runs 3 filler batches so that every
    forward's all-gather has both ranks."""
    import torch.distributed as dist
    from conftest import tiny_llama, with_lora

    from curvsafe.curvature.sharded import shard_model
    from curvsafe.eval.generate import greedy_continue

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = shard_model(with_lora(tiny_llama(torch.float32)))
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] if rank == 0 else []
        got = greedy_continue(model, prompts, pad_id=0, eos_id=2, max_new_tokens=5, batch_size=1)
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
        model = None  # freed before the group is left (a sharded model holds it)
    finally:
        leave_group()


def test_sharded_decoding_with_unequal_batches_per_rank(tmp_path):
    import torch.multiprocessing as mp
    from conftest import tiny_llama, with_lora

    from curvsafe.eval.generate import greedy_continue

    mp.spawn(_sharded_decoding, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    want = greedy_continue(with_lora(tiny_llama(torch.float32)), [[5, 6, 7], [8, 9], [10, 11, 12, 13]], pad_id=0,
                           eos_id=2, max_new_tokens=5, batch_size=1)
    assert torch.load(tmp_path / "rank0.pt") == want and len(want) == 3
    assert torch.load(tmp_path / "rank1.pt") == []


def test_balance_splits_the_largest_batches_until_every_rank_gets_as_many():
    from curvsafe.ranks import balance

    batches = [{"input_ids": torch.arange(n * 2).reshape(n, 2) + 100 * i} for i, n in enumerate((4, 3, 1))]
    out = balance(batches, 2)
    assert [len(b["input_ids"]) for b in out] == [2, 2, 3, 1]  # the 4-row batch split in order
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), torch.cat([b["input_ids"] for b in batches]))
    assert [len(b["input_ids"]) for b in balance(batches, 5)] == [2, 2, 2, 1, 1]  # then the 3-row one
    assert len(balance(batches, 3)) == 3 and balance(batches, 3)[0] is batches[0]
    with pytest.raises(ValueError, match="cannot make a multiple of 4"):
        balance([{"input_ids": torch.zeros(1, 2)}] * 3, 4)


def test_sharding_helpers_are_the_identity_in_one_process():
    assert shard([1, 2, 3], "items") == [1, 2, 3]
    assert map_sharded(lambda part: [x * 2 for x in part], [1, 2, 3]) == [2, 4, 6]
    assert map_sharded(lambda part: [], []) == []
    with pytest.raises(ValueError, match="one result per item"):
        map_sharded(lambda part: part[:1], [1, 2])
