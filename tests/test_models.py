"""Model loading: FSDP2-sharded loading (each rank reads its own rows) equals loading whole, then sharding."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from conftest import tiny_gpt2, tiny_llama, tiny_qwen2, with_lora
from test_distributed import free_port

from curvsafe.models import ModelLoadError, load_sharded_model
from curvsafe.ranks import leave_group


def _compare_loads(rank, port, cases, out_dir):
    """For every case (model, adapter, dtype, trainable): the whole load sharded against the sharded load. Writes
    what each rank saw."""
    import torch.distributed as dist

    from curvsafe.curvature.sharded import shard_model, whole_values
    from curvsafe.models import load_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = []
    try:
        for model_dir, adapter_dir, dtype, trainable in cases:
            want = shard_model(load_model(model_dir, adapter_dir, dtype=dtype, trainable_adapter=trainable,
                                          with_tokenizer=False)[0])
            got = load_sharded_model(model_dir, adapter_dir, dtype=dtype, trainable_adapter=trainable,
                                     with_tokenizer=False)[0]
            pw, pg = dict(want.named_parameters()), dict(got.named_parameters())
            ww, wg = whole_values(pw), whole_values(pg)
            bw, bg = dict(want.named_buffers()), dict(got.named_buffers())
            ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 3, 4]])
            with torch.no_grad():
                logits_equal = torch.equal(want(input_ids=ids).logits, got(input_ids=ids).logits)
            seen.append({
                "names": sorted(pw) == sorted(pg) and sorted(bw) == sorted(bg),
                "sharded": sum(p.to_local().numel() for p in pg.values()) < sum(p.numel() for p in wg.values()),
                "params": [n for n in ww if not (torch.equal(ww[n], wg[n]) and ww[n].dtype == wg[n].dtype)],
                "requires_grad": [n for n in pw if pw[n].requires_grad != pg[n].requires_grad],
                "trainable": sum(p.requires_grad for p in pg.values()),
                "buffers": [n for n in bw if not torch.equal(bw[n], bg[n])],
                "modes": [n for n, m in want.named_modules() if m.training != got.get_submodule(n).training],
                "logits": logits_equal})
            want = got = None  # freed before the group is left (a sharded model holds it)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        leave_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved models and adapters: a Llama in index-split files, a tied GPT-2 (Conv1D) saved in bf16, a Qwen2
    with biases; adapters on each; one adapter for a model of another width; a .bin checkpoint."""
    d = tmp_path_factory.mktemp("checkpoints")
    llama = tiny_llama(torch.float32)
    llama.save_pretrained(d / "llama", max_shard_size="2KB")  # many files and an index
    with_lora(llama).save_pretrained(d / "llama-lora")
    gpt2 = tiny_gpt2(torch.float32, tie=True)
    gpt2.to(torch.bfloat16).save_pretrained(d / "gpt2-bf16")
    with_lora(gpt2.float(), targets=("c_attn", "c_fc")).save_pretrained(d / "gpt2-lora")
    tiny_qwen2(torch.float32).save_pretrained(d / "qwen2")
    from conftest import llama_config
    from transformers import LlamaForCausalLM

    with_lora(LlamaForCausalLM(llama_config(hidden_size=32))).save_pretrained(d / "wide-lora")
    llama.config.save_pretrained(d / "llama-bin")  # a pickled checkpoint, as older transformers wrote them
    torch.save(llama.state_dict(), d / "llama-bin" / "pytorch_model.bin")
    return d


def test_sharded_loading_equals_the_whole_model_sharded(checkpoints, tmp_path):
    import torch.multiprocessing as mp

    d = str(checkpoints)
    cases = [(f"{d}/llama", f"{d}/llama-lora", "float32", True),
             (f"{d}/gpt2-bf16", f"{d}/gpt2-lora", "float32", False),
             (f"{d}/qwen2", None, "float64", False)]
    assert len(list((checkpoints / "llama").glob("model-*.safetensors"))) > 1
    mp.spawn(_compare_loads, args=(free_port(), cases, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, got in zip(cases, seen):
            assert got["names"] and got["sharded"], case
            assert got["params"] == [] and got["requires_grad"] == [] and got["buffers"] == [], (case, got)
            assert got["logits"] and got["modes"] == [], (case, got)
        # LoRA A and B of q, v, down in 2 layers; a frozen adapter; no adapter: every weight, as from_pretrained
        assert [got["trainable"] for got in seen] == [6 * 2, 0, 27]


def test_sharded_loading_checks_the_files_before_sharding(checkpoints):
    """Every check runs before the first shard exists (so in one process, with no process group)."""
    with pytest.raises(ModelLoadError, match="no model.safetensors or model.safetensors.index.json"):
        load_sharded_model(checkpoints / "llama-bin", with_tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"wide-lora: .*lora_A.weight has shape \[2, 32\], the model's"):
        load_sharded_model(checkpoints / "llama", checkpoints / "wide-lora", with_tokenizer=False)
    broken = checkpoints / "llama-broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((checkpoints / "llama" / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="llama-broken: cannot read the checkpoint"):
        load_sharded_model(broken, with_tokenizer=False)
    missing = checkpoints / "llama-without-its-norm"
    missing.mkdir()
    (missing / "config.json").write_bytes((checkpoints / "llama" / "config.json").read_bytes())
    state = {k: v for k, v in tiny_llama(torch.float32).state_dict().items() if k != "model.norm.weight"}
    save_file(state, missing / "model.safetensors")
    with pytest.raises(ModelLoadError, match="no tensor for the model's model.norm.weight"):
        load_sharded_model(missing, with_tokenizer=False)
