"""CurvSafe in the HF Trainer and TRL's SFTTrainer (curvsafe.optim.trainer), in one process, under DDP and under
accelerate's FSDP2 preparation with 2 gloo ranks, and their checkpoints (tests/trainer_driver.py runs each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from test_distributed import free_port

DRIVER = Path(__file__).with_name("trainer_driver.py")


def train(way: str, out: Path, ranks: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
                 f"--master-port={free_port()}"] if ranks > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(DRIVER), way, str(out / f"{way}.pt")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / f"{way}.pt")


def lora_rel_err(a: dict, b: dict) -> float:
    return rel_err(torch.cat([a[k].flatten() for k in sorted(a)]), torch.cat([b[k].flatten() for k in sorted(b)]))


def test_curvsafe_trainer_builds_what_a_trainer_given_curvsafe_runs(tmp_path):
    mixin, given, adamw = (train(w, tmp_path) for w in ("mixin", "optimizers", "adamw"))
    assert mixin["optimizer"] == given["optimizer"] == "CurvSafe" and adamw["optimizer"] == "AdamW"
    assert len(mixin["losses"]) == 4 and mixin["losses"] == given["losses"]
    assert all(torch.equal(mixin["lora"][k], given["lora"][k]) for k in given["lora"])
    assert lora_rel_err(mixin["lora"], adamw["lora"]) > 1e-2  # the projection acted
    # the mixin's logs say what CurvSafe did at each logged step (logging_steps=1); a plain Trainer's do not
    logs = mixin["curvsafe_logs"]
    assert len(logs) == 4 and all(set(h) == {"curvsafe_kept", "curvsafe_guard", "curvsafe_refreshes",
                                             "curvsafe_damped", "curvsafe_effective_rank"} for h in logs)
    assert all(0 < h["curvsafe_kept"] <= 1 and h["curvsafe_guard"] >= 0 and 0 < h["curvsafe_damped"] < 1
               and h["curvsafe_effective_rank"] >= 1 for h in logs)
    assert logs[0]["curvsafe_refreshes"] == 1 and given["curvsafe_logs"] == [{}] * 4 == adamw["curvsafe_logs"]


def test_screening_under_the_trainer_logs_its_share_and_changes_the_steps(tmp_path):
    """The Trainer clips the gradient before the optimizer's step; the screen removes the screened examples at that
    scale (a mismatch would screen nothing) and the logs carry the share it screened, and the held-out monitor's
    rise at the latest refresh (0 at the first: the parameters are those it was recorded at)."""
    screened, plain = train("screen", tmp_path), train("mixin", tmp_path)
    shares = [h["curvsafe_screened"] for h in screened["curvsafe_logs"]]
    assert len(shares) == 4 and all(0 <= s <= 1 for s in shares) and 0 < sum(shares) < 4
    rises = [h["curvsafe_monitor"] for h in screened["curvsafe_logs"]]
    assert rises[0] == pytest.approx(0.0, abs=1e-12) and any(r != rises[0] for r in rises)
    assert lora_rel_err(screened["lora"], plain["lora"]) > 1e-3


def test_screening_under_accelerate_fsdp2_takes_the_steps_of_one_process(tmp_path):
    """Each rank screens its own rows of the clipped, sharded gradient: the steps and the shares screened are one
    process's on the global batch."""
    one, sharded = train("screen", tmp_path), train("screen-fsdp2", tmp_path, ranks=2)
    assert sharded["sharded"] and not one["sharded"]
    shares = [h["curvsafe_screened"] for h in sharded["curvsafe_logs"]]
    assert shares == [h["curvsafe_screened"] for h in one["curvsafe_logs"]] and 0 < sum(shares) < len(shares)
    rises = [h["curvsafe_monitor"] for h in sharded["curvsafe_logs"]]  # the monitor's NLL over both ranks' rows
    assert rises == pytest.approx([h["curvsafe_monitor"] for h in one["curvsafe_logs"]], abs=1e-6)
    assert lora_rel_err(sharded["lora"], one["lora"]) < 1e-5  # accelerate runs FSDP2 in float32


def test_curvsafe_trainer_resumed_from_a_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    """The Trainer's checkpoint holds CurvSafe's whole state (its optimizer.pt): a new model and trainer resumed
    from step 2 end bit for bit where the uninterrupted 4 steps do."""
    resumed, straight = train("resume", tmp_path), train("mixin", tmp_path)
    assert (tmp_path / "trainer" / "checkpoint-2" / "optimizer.pt").is_file()
    assert all(torch.equal(resumed["lora"][k], straight["lora"][k]) for k in straight["lora"])


def test_curvsafe_trainer_resumed_under_ddp_restores_each_ranks_own_safety_state(tmp_path):
    """Under DDP the Trainer writes the optimizer file from rank 0 only, and each rank holds its own shard of the
    safety data: each rank's CurvSafe state is saved beside it (``curvsafe_rank{R}_of_2.pt``) and restored, so the
    resumed 2-rank run ends where the uninterrupted one does (with rank 0's state on both ranks it does not)."""
    from curvsafe.optim.trainer import safety_state_file

    resumed, straight = train("resume", tmp_path, ranks=2), train("mixin", tmp_path, ranks=2)
    assert all((tmp_path / "trainer" / "checkpoint-2" / safety_state_file(r, 2)).is_file() for r in range(2))
    assert all(torch.equal(resumed["lora"][k], straight["lora"][k]) for k in straight["lora"])



def test_curvsafe_trainer_resumed_under_accelerate_fsdp2_repeats_the_uninterrupted_run(tmp_path):
    """Under FSDP2 accelerate checkpoints the model and the optimizer through ``torch.distributed.checkpoint``
    (sharded state dicts), which keeps only the wrapped optimizer's ``state`` and ``param_groups``; each rank's
    CurvSafe state is saved beside them and restored, and the resumed run ends where the uninterrupted one does."""
    from curvsafe.optim.trainer import safety_state_file

    resumed, straight = train("resume-fsdp2", tmp_path, ranks=2), train("fsdp2", tmp_path, ranks=2)
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    assert (checkpoint / "optimizer_0" / ".metadata").is_file()  # DCP's, not a torch.save of the optimizer
    assert all((checkpoint / safety_state_file(r, 2)).is_file() for r in range(2))
    assert resumed["sharded"] and resumed["optimizer"] == "CurvSafe"
    assert all(torch.equal(resumed["lora"][k], straight["lora"][k]) for k in straight["lora"])

def test_a_checkpoint_of_another_number_of_ranks_is_refused(tmp_path):
    """Each rank's CurvSafe state belongs to its shard of the safety data: resuming a 2-rank checkpoint in one
    process is refused, naming the files."""
    from conftest import make_batch, tiny_llama, with_lora
    from transformers import TrainingArguments

    from curvsafe.optim import CurvSafeTrainer
    from curvsafe.optim.trainer import safety_state_file

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1)
    trainer = CurvSafeTrainer(model=with_lora(tiny_llama()), args=args, train_dataset=[],
                              safety_data=[make_batch(batch=2, seq=6, seed=1, prompt=4)])
    trainer.create_optimizer()
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for rank in range(2):
        (checkpoint / safety_state_file(rank, 2)).write_bytes(b"")
    with pytest.raises(ValueError, match=r"another number of ranks \(curvsafe_rank0_of_2.pt, curvsafe_rank1_of_2"):
        trainer._load_optimizer_and_scheduler(str(checkpoint))


def test_curvsafe_trainer_under_accelerate_fsdp2_takes_the_steps_of_one_process(tmp_path):
    """The Trainer refuses ``optimizers=`` under FSDP; the mixin makes CurvSafe around its AdamW, accelerate shards
    the model (per decoder layer, then the root; in float32) and swaps the optimizer's parameters."""
    one, sharded = train("mixin", tmp_path), train("fsdp2", tmp_path, ranks=2)
    assert sharded["sharded"] and not one["sharded"] and sharded["optimizer"] == "CurvSafe"
    assert lora_rel_err(sharded["lora"], one["lora"]) < 1e-5  # accelerate runs FSDP2 in float32
    assert sharded["losses"] == pytest.approx(one["losses"], rel=1e-6)


def test_trl_sft_trainer_with_the_mixin_at_strength_zero_is_its_own_adamw(tmp_path):
    zero, plain = train("trl-zero", tmp_path), train("trl-plain", tmp_path)
    assert (zero["optimizer"], plain["optimizer"]) == ("CurvSafe", "AdamW") and len(plain["losses"]) == 4
    assert all(torch.equal(zero["lora"][k], plain["lora"][k]) for k in plain["lora"])


def test_trl_sft_trainer_with_the_mixin_under_accelerate_fsdp2_takes_the_steps_of_the_trainer(tmp_path):
    """TRL's SFTTrainer under FSDP2 takes the HF Trainer's steps (one process, same CurvSafe). In one process it
    does not: its first loss already differs by 1e-5 (at strength 0 too), TRL's own doing, so the reference is
    the Trainer."""
    trainer, sharded, plain = (train("mixin", tmp_path), train("trl-fsdp2", tmp_path, ranks=2),
                               train("trl-plain", tmp_path))
    assert sharded["sharded"] and sharded["optimizer"] == "CurvSafe"
    assert lora_rel_err(sharded["lora"], trainer["lora"]) < 1e-5
    assert sharded["losses"] == pytest.approx(trainer["losses"], rel=1e-6)
    assert lora_rel_err(sharded["lora"], plain["lora"]) > 1e-2  # the projection acted


def test_curvsafe_trainer_refuses_an_optimizer_of_its_own():
    from curvsafe.optim import CurvSafeTrainer

    with pytest.raises(ValueError, match="make their optimizer themselves"):
        CurvSafeTrainer(model=torch.nn.Linear(2, 2), optimizers=(torch.optim.SGD([torch.zeros(1)], lr=1), None),
                        safety_data=["a prompt"])
