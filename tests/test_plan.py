"""curvsafe.plan: the estimate from config files alone, its curvature bytes against fitted objects, its peak
against measured memory on CPU, and restore's refusal of an impossible budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import llama_config, make_batch, tiny_llama, with_lora

from curvsafe.cli import main
from curvsafe.curvature import EKFAC, KFAC
from curvsafe.curvature.lowrank import LowRank
from curvsafe.plan import GGN_COST, PlanSettings, estimate, kfac_bytes, one_pass, parse_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def config_only(tmp_path):
    """A model folder with only config.json and an adapter folder with only adapter_config.json."""
    from peft import LoraConfig

    llama_config(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000).save_pretrained(tmp_path / "model")
    LoraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM", inference_mode=True).save_pretrained(
        tmp_path / "adapter")  # as PEFT saves a trained adapter: the plan must still count its weights trainable
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json"]
    return tmp_path


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_from_config_files_only(config_only, capsys):
    model, adapter = str(config_only / "model"), str(config_only / "adapter")
    out = plan_json(capsys, "--model", model, "--adapter", adapter)
    assert set(out["methods"]) == {"lbfgs", "kfac", "ekfac", "cg", "sgd", "curvsafe"}
    for m in out["methods"].values():
        assert isinstance(m["curvature_bytes"], int) and isinstance(m["peak_bytes"], int)
        assert m["peak_bytes"] > out["weight_bytes"] > 0 and m["steps_per_iteration"] >= 1
    # 2 layers x r=8 x sum of (d_in + d_out): q, o 256+256; k, v 256+128; gate, up, down 256+1024
    assert out["trainable_params"] == 2 * 8 * (2 * 512 + 2 * 384 + 3 * 1280)
    dense = plan_json(capsys, "--model", model, "--adapter", adapter, "--dense")
    bounded = plan_json(capsys, "--model", model, "--adapter", adapter, "--max-dense-dim", "300", "--rank", "16",
                        "--oversample", "8", "--method", "kfac")
    assert set(bounded["methods"]) == {"kfac"} and bounded["sketched_factors"] == 2 * 3  # gate/up B, down A
    listed = plan_json(capsys, "--model", model, "--adapter", adapter, "--method", "kfac,lbfgs", "curvsafe")
    assert set(listed["methods"]) == {"kfac", "lbfgs", "curvsafe"}  # comma- or space-separated
    with pytest.raises(SystemExit):
        main(["plan", "--model", model, "--method", "kfac,bogus"])
    assert "invalid method bogus" in capsys.readouterr().err
    assert bounded["methods"]["kfac"]["curvature_bytes"] < dense["methods"]["kfac"]["curvature_bytes"]
    chunked = plan_json(capsys, "--model", model, "--adapter", adapter, "--ggn-rows", "2")
    for m in ("lbfgs", "cg"):  # 2 of the 8 rows per GGN pass: less activation memory, the same curvature
        assert chunked["methods"][m]["peak_bytes"] < out["methods"][m]["peak_bytes"]
        assert chunked["methods"][m]["curvature_bytes"] == out["methods"][m]["curvature_bytes"]
    assert main(["plan", "--model", model, "--adapter", adapter, "--max-memory", "1MiB"]) == 0
    assert "fit in 1.00 MiB: none" in capsys.readouterr().out
    refined = plan_json(capsys, "--model", model, "--adapter", adapter, "--max-dense-dim", "300", "--rank", "16",
                        "--oversample", "8", "--passes", "2")
    single = plan_json(capsys, "--model", model, "--adapter", adapter, "--max-dense-dim", "300", "--rank", "16",
                       "--oversample", "8")
    for m in ("kfac", "ekfac"):  # the second pass: each sketch's own test matrix and one more pass over the task
        assert refined["methods"][m]["curvature_bytes"] > single["methods"][m]["curvature_bytes"]
        assert refined["methods"][m]["steps_per_iteration"] == single["methods"][m]["steps_per_iteration"] + 1
    assert refined["methods"]["curvsafe"] == single["methods"]["curvsafe"]  # its EMA of fits takes one pass each
    every = plan_json(capsys, "--model", model, "--adapter", adapter, "--task-batches", "8")
    subset = plan_json(capsys, "--model", model, "--adapter", adapter, "--task-batches", "8",
                       "--curvature-batches", "2")
    fewer = {m: every["methods"][m]["steps_per_iteration"] - subset["methods"][m]["steps_per_iteration"]
             for m in every["methods"]}  # the refresh's passes over 2 batches instead of 8; the rest as it was
    assert fewer == pytest.approx({"lbfgs": 8 * GGN_COST * 6, "kfac": 6, "ekfac": 6, "cg": 11 * GGN_COST * 6,
                                   "sgd": 0, "curvsafe": 0})
    assert all(every["methods"][m]["peak_bytes"] == subset["methods"][m]["peak_bytes"] for m in every["methods"])


def test_plan_gives_the_largest_rank_that_fits_a_curvature_budget(config_only, capsys):
    model, adapter = str(config_only / "model"), str(config_only / "adapter")
    args = ["--model", model, "--adapter", adapter, "--max-dense-dim", "300", "--oversample", "8"]
    budget = plan_json(capsys, *args, "--rank", "40")["methods"]["curvsafe"]["curvature_bytes"]
    ranks = plan_json(capsys, *args, "--curvature-budget", str(budget))["largest_rank"]
    assert set(ranks) == {"kfac", "ekfac", "curvsafe"}
    # restore's kfac / ekfac hold less at the same rank (no factors next to the bases); EK-FAC's corrections more
    assert ranks["curvsafe"] == 40 and 40 < ranks["ekfac"] <= ranks["kfac"]
    for m, r in ranks.items():
        assert plan_json(capsys, *args, "--rank", str(r))["methods"][m]["curvature_bytes"] <= budget
        assert plan_json(capsys, *args, "--rank", str(r + 1))["methods"][m]["curvature_bytes"] > budget
    assert main(["plan", *args, "--curvature-budget", "1KiB", "--method", "kfac"]) == 0
    assert "largest --rank whose curvature fits 1.00 KiB: kfac none" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not with --dense"):
        main(["plan", "--model", model, "--dense", "--curvature-budget", "1GiB"])


def test_plan_per_rank_under_fsdp2_sharding(config_only, capsys):
    """``--shards W``: each rank holds 1/W of every weight plus the root's whole weights and two decoder layers'
    (in flight); curvature is replicated, the same."""
    from curvsafe.plan import meta_model

    model, adapter = str(config_only / "model"), str(config_only / "adapter")
    one = plan_json(capsys, "--model", model, "--adapter", adapter)
    four = plan_json(capsys, "--model", model, "--adapter", adapter, "--shards", "4")
    assert set(four["methods"]) == set(one["methods"])
    meta = meta_model(config_only / "model", config_only / "adapter")
    nbytes = [sum(p.numel() * p.element_size() for p in layer.parameters())
              for layer in meta.base_model.model.model.layers]
    total = sum(p.numel() * p.element_size() for p in meta.parameters())
    assert one["weight_bytes"] == total
    assert four["weight_bytes"] == -(-total // 4) + (total - sum(nbytes)) + sum(nbytes[:2])
    for m in four["methods"]:
        assert four["methods"][m]["curvature_bytes"] == one["methods"][m]["curvature_bytes"]
        assert four["methods"][m]["peak_bytes"] - one["methods"][m]["peak_bytes"] == (
            four["weight_bytes"] - one["weight_bytes"])
    # a deep model: the shards dominate (2 of these 2 layers are in flight, so sharding saves nothing above)
    deep = config_only / "deep"
    llama_config(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000, num_hidden_layers=32).save_pretrained(deep)
    deep_one = plan_json(capsys, "--model", str(deep), "--adapter", adapter)
    deep_four = plan_json(capsys, "--model", str(deep), "--adapter", adapter, "--shards", "4")
    assert deep_four["weight_bytes"] < 0.4 * deep_one["weight_bytes"]


def test_plan_counts_what_the_example_screen_holds(config_only, capsys):
    """``--screen`` adds to CurvSafe's peak alone: the per-example gradients of a batch (what a screen holds after
    a backward, counted on a real one) and three adapter-sized vectors, a fourth under FSDP2."""
    from curvsafe.capture import find_blocks
    from curvsafe.optim.screen import ExampleScreen

    files = ["--model", str(config_only / "model"), "--adapter", str(config_only / "adapter"), "--batch-size", "8"]
    for shards, vectors in ((1, 3), (2, 4)):
        plain = plan_json(capsys, *files, "--shards", str(shards))
        screened = plan_json(capsys, *files, "--shards", str(shards), "--screen")
        extra = {m: screened["methods"][m]["peak_bytes"] - p["peak_bytes"] for m, p in plain["methods"].items()}
        assert extra.pop("curvsafe") == 4 * plain["trainable_params"] * (8 + vectors)
        assert set(extra.values()) == {0}
    model = with_lora(tiny_llama(dtype=torch.float32))
    screen = ExampleScreen(model, find_blocks(model), threshold=0.0)
    model.train()
    model(**make_batch(batch=3)).loss.backward()
    held = sum(t.numel() * t.element_size() for e in screen._grads.values() for t in e.values())
    assert held == 3 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_curvsafe_plan_counts_the_truncated_bases_its_projector_holds():
    """With ``subspace`` the eigenbases the plan counts for CurvSafe (kept vectors and eigenvalues per distinct
    factor) are those its projector holds after refreshes: d x rank for the dense factors it truncates."""
    from curvsafe.curvature.subspace import SubspaceEigen
    from curvsafe.optim import CurvSafe

    sub = SubspaceEigen(min_dim=16, rank=4)
    model = with_lora(tiny_llama(dtype=torch.float32))
    opt = CurvSafe(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model,
                   [make_batch(seed=5)], subspace=sub, refresh_every=1)
    model.train()
    for seed in range(2):
        opt.zero_grad()
        model(**make_batch(seed=seed)).loss.backward()
        opt.step()
    bases = {id(Q): Q for QA, QG, *_ in opt.constraint.projector.eigen.values() for Q in (QA, QG)}
    assert any(Q.shape[1] == 4 for Q in bases.values()) and any(Q.shape[0] == Q.shape[1] for Q in bases.values())
    held = sum((Q.numel() + Q.shape[1]) * 4 for Q in bases.values())
    names = [b.name for b in opt.blocks]
    assert kfac_bytes(model, None, names, subspace=sub)["eigen"] == held < kfac_bytes(model, None, names)["eigen"]


@pytest.mark.parametrize("low", [None, LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2),
                                 LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2, passes=2)])
def test_plan_curvature_bytes_equal_the_fitted_objects(low, monkeypatch):
    from curvsafe.curvature.kfac import _FitPass
    from curvsafe.curvature.lowrank import SketchedFactor

    batch_sums = []  # what a fit holds beside its running sums at each batch's end: the shared inputs' sums
    end = _FitPass.on_batch_end

    def spy(self):
        batch_sums.append(sum(t.numel() * t.element_size() for f in self.batch.A.values()
                              for t in (f.held() if isinstance(f, SketchedFactor) else [f])))
        end(self)

    monkeypatch.setattr(_FitPass, "on_batch_end", spy)
    model = with_lora(tiny_llama(dtype=torch.float32))
    op = EKFAC(model, low_rank=low).fit([make_batch(), make_batch(seed=2)])
    for b in op.blocks:
        op.eigen(b.name)
    planned = kfac_bytes(model, low)
    shared = kfac_bytes(model, one_pass(low))["batch_sums"]
    assert shared > 0 and max(batch_sums) == shared  # the first pass's
    assert planned["batch_sums"] >= shared
    assert op.curvature_bytes() == planned["factors"] + planned["eigen"] + planned["corrected"]
    plain = KFAC(model, low_rank=low).fit([make_batch()])
    for b in plain.blocks:
        plain.eigen(b.name)
    assert plain.curvature_bytes() == planned["factors"] + planned["eigen"]
    # restore's operators free each factor at its decomposition: the factors, then the bases, never both
    lean = KFAC(model, low_rank=low, keep_factors=False).fit([make_batch()])
    assert lean.curvature_bytes() == planned["factors"]
    lean.eigen(lean.blocks[0].name)
    assert lean.curvature_bytes() == planned["eigen"] and not lean.factors
    lean_ek = EKFAC(model, low_rank=low, keep_factors=False).fit([make_batch(), make_batch(seed=2)])
    assert lean_ek.curvature_bytes() == planned["eigen"] + planned["corrected"]
    plan = estimate(model, PlanSettings(low_rank=low))
    assert plan.methods["kfac"].curvature_bytes == max(planned["factors"], planned["eigen"])
    assert plan.methods["ekfac"].curvature_bytes == max(planned["factors"], planned["eigen"] + planned["corrected"])


def test_plan_prices_ggn_passes_of_ggn_rows_rows():
    """lbfgs / cg GGN passes hold ``ggn_rows`` rows at ``seq_len``: fewer than a batch (split) lower the peak,
    more (merged batches) raise it, ``batch_size`` rows is the default."""
    from curvsafe.plan import PlanSettings, estimate

    model = with_lora(tiny_llama(dtype=torch.float32))

    def peak(rows):
        return estimate(model, PlanSettings(batch_size=8, seq_len=64, ggn_rows=rows)).methods["lbfgs"].peak_bytes

    assert peak(2) < peak(None) == peak(8) < peak(32)


PEAK_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import llama_config
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
from curvsafe.plan import PeakMemory, PlanSettings, estimate
torch.manual_seed(0)
model = LlamaForCausalLM(llama_config(vocab_size=8000, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256))
model = get_peft_model(model, LoraConfig(r=8, target_modules={targets!r}))
ids = torch.randint(3, 8000, (4, 128))
batch = {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}}
plan = estimate(model, PlanSettings(batch_size=4, seq_len=128))
warm = torch.randint(3, 8000, (1, 8))  # touch the code paths first: their pages are not tensor memory
model(input_ids=warm, labels=warm).loss.backward()
model.zero_grad(set_to_none=True)
meter = PeakMemory("cpu")
meter.start()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
model.train()
model(**batch).loss.backward()
opt.step()
print(json.dumps({{"measured": meter.stop(), "planned": plan.training_step_bytes - plan.weight_bytes}}))
"""


def test_plan_peak_against_the_measured_peak_on_cpu():
    """A LoRA training step of a 2-layer Llama (hidden 512, 4 x 128 tokens) in a fresh process: the plan's peak
    above the weights against the resident set's sampled peak above the built model."""
    script = PEAK_SCRIPT.format(tests=str(Path(__file__).parent), targets=TARGETS)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks leave the resident set (scale.py)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.75 <= r["planned"] / r["measured"] <= 1.33, r


@pytest.mark.parametrize("saved, expected", [({"dtype": "bfloat16"}, torch.bfloat16),
                                              ({"torch_dtype": "bfloat16"}, torch.bfloat16),  # older transformers
                                              ({}, torch.float32)])
def test_the_weights_dtype_comes_from_either_name_of_the_config_field(tmp_path, saved, expected):
    from transformers import AutoConfig

    from curvsafe.plan import _config_dtype

    config = llama_config().to_dict()
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **saved}))
    assert _config_dtype(AutoConfig.from_pretrained(tmp_path)) == expected


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2 ** 30 and parse_bytes("512M") == 512 * 2 ** 20
    assert parse_bytes("1.5e9") == 1_500_000_000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_restore_refuses_an_impossible_budget_before_loading_weights(tmp_path, capsys):
    """Only configs exist (no weights): the refusal must come from the estimate, before any weight is read."""
    from peft import LoraConfig

    llama_config().save_pretrained(tmp_path / "model")
    LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path / "ad")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p {i}", "response": f"r {i}"}) + "\n" for i in range(4)))
    args = ["restore", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "ad"), "--harmful", str(data),
            "--task", str(data), "--out", str(tmp_path / "out"), "--method", "kfac", "--max-memory", "1KiB"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "kfac needs about" in err and "--max-memory is 1.00 KiB" in err and "no method fits" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse refuses a size it cannot read
        main(args[:-2] + ["--max-memory", "lots"])
