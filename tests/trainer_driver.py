"""Train a tiny LoRA Llama for 4 steps with the HF Trainer (or TRL's SFTTrainer) and CurvSafe; save the LoRA
weights (whole) to OUT (used by test_trainer.py).

    python trainer_driver.py WAY OUT            # one process
    torchrun --nproc-per-node 2 trainer_driver.py fsdp2 OUT     # or trl-fsdp2, screen-fsdp2

WAY: ``mixin`` (``CurvSafeTrainer``), ``resume`` (the same, saving a checkpoint every 2 steps, then a new model
and trainer resumed from step 2), ``adamw`` (the Trainer's own AdamW alone), ``optimizers`` (a plain
Trainer given ``optimizers=(CurvSafe(AdamW), None)``, the AdamW built as the Trainer builds its own), ``fsdp2``
(``CurvSafeTrainer`` under accelerate's FSDP2; ``mixin`` and ``resume`` under ``torchrun`` without it: DDP),
``trl-mixin`` / ``trl-fsdp2`` / ``trl-zero`` / ``trl-plain``
(TRL's SFTTrainer with the mixin, the same under FSDP2, the mixin at strength 0 and no guard, no CurvSafe;
``trl-zero-fsdp2`` the third under FSDP2), ``screen`` (``CurvSafeTrainer`` with example screening at 0 and a
held-out monitor; ``screen-fsdp2`` the same under FSDP2).

Global batch 4 (per device 4 in one process, 2 on each of 2 ranks), float64, a constant learning rate. The safety
data is 2 batches of 4 rows; under a launcher each rank passes its own row halves of both, so a batch position
holds the same rows as in one process. accelerate takes its FSDP path only on accelerators (on CPU it turns an
FSDP configuration into plain data parallelism); ``fsdp2`` lifts that gate so that accelerate's own FSDP2
preparation (``fully_shard`` per decoder layer and the root, the optimizer's parameters swapped) runs here.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import VOCAB, tiny_llama  # noqa: E402

way, out = sys.argv[1], sys.argv[2]
rank, ranks = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

if way.endswith("fsdp2"):
    import accelerate.state
    from accelerate.utils import DistributedType

    _init = accelerate.state.AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and kwargs.get("fsdp_plugin") is not None:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, kwargs["fsdp_plugin"]

    accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from curvsafe.optim import CurvSafe, CurvSafeTrainer, CurvSafeTrainerMixin  # noqa: E402



def new_model():
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(torch.float64), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                lora_dropout=0.0))


model = new_model()
g = torch.Generator().manual_seed(1)
examples = []
for _ in range(16):
    ids = torch.randint(3, VOCAB, (8,), generator=g)
    examples.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids.clone()})
safety = []
for _ in range(2):
    ids = torch.randint(3, VOCAB, (4, 8), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    rows = slice(2 * rank, 2 * rank + 2) if ranks > 1 else slice(None)
    safety.append({"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]), "labels": labels[rows]})
monitor_ids = torch.randint(3, VOCAB, (4, 4), generator=g)[slice(2 * rank, 2 * rank + 2) if ranks > 1 else slice(None)]
monitor = [{"input_ids": monitor_ids, "attention_mask": torch.ones_like(monitor_ids)}]  # prompts only

fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                      **({"state_dict_type": "SHARDED_STATE_DICT"} if way == "resume-fsdp2" else {})}}
# a checkpoint folder is shared by the ranks, as in a real run; the other ways keep theirs apart
folder = "trainer" if way.startswith("resume") else f"trainer-{rank}"
args = TrainingArguments(output_dir=os.path.join(os.path.dirname(out), folder),
                         per_device_train_batch_size=4 // ranks, max_steps=4, learning_rate=1e-2,
                         lr_scheduler_type="constant", warmup_steps=0, report_to=[],
                         **({"save_strategy": "steps", "save_steps": 2} if way.startswith("resume")
                            else {"save_strategy": "no"}),
                         use_cpu=True, logging_steps=1, remove_unused_columns=False, dataloader_num_workers=0,
                         disable_tqdm=True, seed=0, optim="adamw_torch", **(fsdp if way.endswith("fsdp2") else {}))
if way in ("mixin", "fsdp2", "resume", "resume-fsdp2"):
    trainer = CurvSafeTrainer(model=model, args=args, train_dataset=examples, safety_data=safety)
elif way in ("screen", "screen-fsdp2"):  # the Trainer clips the gradient before the step: screening keeps it
    trainer = CurvSafeTrainer(model=model, args=args, train_dataset=examples, safety_data=safety,
                              monitor_data=monitor, curvsafe_options={"screen": 0.0})
elif way == "adamw":
    trainer = Trainer(model=model, args=args, train_dataset=examples)
elif way == "optimizers":
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}, {"params": [], "weight_decay": 0.0}],
                              lr=1e-2)  # the Trainer's AdamW (its two weight-decay groups; LoRA decays none)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      optimizers=(CurvSafe(adamw, model, safety), None))
else:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class CurvSafeSFTTrainer(CurvSafeTrainerMixin, SFTTrainer):
        pass

    data = Dataset.from_list([{"input_ids": e["input_ids"].tolist()} for e in examples])
    kept = ("output_dir", "max_steps", "learning_rate", "lr_scheduler_type", "seed", "use_cpu", "report_to",
            "save_strategy", "logging_steps")
    sft = SFTConfig(**{k: v for k, v in args.to_dict().items() if k in kept},
                    per_device_train_batch_size=4 // ranks, disable_tqdm=True, remove_unused_columns=False,
                    dataset_kwargs={"skip_prepare_dataset": True}, **(fsdp if way.endswith("fsdp2") else {}))

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    from curvsafe.testbed.model import build_tokenizer

    tokenizer = build_tokenizer([f"w{i}" for i in range(VOCAB)])  # SFTTrainer wants one; the data is token ids
    common = dict(model=model, args=sft, train_dataset=data, data_collator=collate, processing_class=tokenizer)
    if way == "trl-plain":
        trainer = SFTTrainer(**common)
    else:  # trl-zero: strength 0 and no guard, the wrapped AdamW bit for bit
        zero = {"strength": 0.0, "guard": False} if way.startswith("trl-zero") else {}
        trainer = CurvSafeSFTTrainer(**common, safety_data=safety, curvsafe_options=zero)
trainer.train()
if way.startswith("resume"):  # a fresh process's run: a new model and trainer, resumed from the step-2 checkpoint
    trainer = CurvSafeTrainer(model=new_model(), args=args, train_dataset=examples, safety_data=safety)
    trainer.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
from curvsafe.curvature.sharded import whole_values  # noqa: E402

state = whole_values({n: p for n, p in trainer.model.named_parameters() if "lora_" in n})  # every rank: a collective
inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
if rank == 0:
    torch.save({"lora": state, "optimizer": type(inner).__name__,
                "sharded": any(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "curvsafe_logs": [{k: v for k, v in h.items() if k.startswith("curvsafe_")}
                                  for h in trainer.state.log_history if "loss" in h]}, out)
if ranks > 1:  # the group torn down while every rank is alive, not at exit (gloo aborts there once a peer is gone)
    from curvsafe.ranks import leave_group  # noqa: E402

    trainer = model = state = inner = None
    leave_group()
