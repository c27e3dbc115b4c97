"""What the SFT and DPO stages share: LoRA set-up, trainer arguments, resume, a wall-clock time
limit, and saving an adapter plus a merged model that plain transformers can load."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_specs.errors import InputError, StageError
from data_specs.schema import FinetuneSpec, LoraSpec
from tasks.core.artifacts import Model
from tasks.core.keys import native_bf16
from tasks.core.stage import RunContext, Where
from tasks.train.loop import Deadline, TimeLimitReached

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (planning stays fast)
    import torch

log = logging.getLogger("gristmill")

TRAINER_DIR = "trainer"  # in the stage's work folder: TRL checkpoints, kept across a killed run


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The short names of the model's linear layers (what LoRA can target)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def lora_config(spec: LoraSpec, model: torch.nn.Module, where: str):
    """A PEFT LoraConfig; target modules the model lacks are bad input that lists what it has."""
    from peft import LoraConfig

    have = linear_module_names(model)
    missing = [t for t in spec.target_modules if t not in have]
    if missing:
        raise InputError(f"{where}.lora.target_modules: the model has no {', '.join(missing)}; "
                         f"its linear modules are: {', '.join(have)}")
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules), task_type="CAUSAL_LM")


def finetune_resolution(cfg: FinetuneSpec, where: Where) -> dict[str, Any]:
    """What TRL's trainer fixes where it runs: the device, and bf16 mixed precision where the device
    computes bf16 natively (fp32 elsewhere); both change the weights."""
    return {"device": where.device, "precision": "bf16" if native_bf16(where.device) else "fp32"}


def trainer_kwargs(spec: FinetuneSpec, ctx: RunContext, max_length: int) -> dict[str, Any]:
    """Arguments every TRL config here gets (SFTConfig and DPOConfig are TrainingArguments)."""
    import torch

    cuda = ctx.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise StageError("this stage was planned for a CUDA device (its fingerprint says so), but this machine has "
                         "none: run it on a GPU worker, or plan it here")
    return dict(
        output_dir=str(ctx.work / TRAINER_DIR), num_train_epochs=spec.epochs, learning_rate=spec.lr,
        per_device_train_batch_size=spec.batch_size, per_device_eval_batch_size=spec.batch_size,
        warmup_steps=spec.warmup_ratio, weight_decay=spec.weight_decay, lr_scheduler_type="cosine",
        max_length=max_length, seed=spec.seed, data_seed=spec.seed, logging_steps=1,
        save_strategy="steps", save_steps=ctx.runtime.save_steps, save_total_limit=1, report_to="none",
        bf16=ctx.resolved["precision"] == "bf16", use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0,
        # TRL turns gradient checkpointing on by default: it saves GPU memory by running each
        # forward twice. A CPU run has memory to spare and only pays the second forward.
        gradient_checkpointing=cuda,
    )


def score_labelled_positions_only() -> bool:
    """Makes TRL's fused LM head score only the positions that carry a label on CPU too.

    TRL (trl.trainer.utils.add_fused_lm_head) projects through the LM head only the positions
    whose next-token label is kept when Triton runs it (CUDA), and every position elsewhere,
    zeroing the rest afterwards. The per-token values are the same either way; on CPU, scoring
    every prompt position of an assistant-only-loss batch is most of a step when the vocabulary
    is large (bench/trl_speed.py). True when the switch is in place (False: a TRL without it)."""
    import trl.trainer.utils as fused

    original = getattr(fused, "_use_triton", None)
    if original is None:
        return False
    if not getattr(original, "gristmill_compact", False):
        def compact(device) -> bool:
            return device.type == "cpu" or original(device)

        compact.gristmill_compact = True
        compact.original = original
        fused._use_triton = compact
    return True


def supervised(spec: FinetuneSpec, model, tokenizer, train_rows: list[dict], val_rows: list[dict], ctx: RunContext,
               label: str, max_length: int, packing: bool):
    """Runs TRL's SFTTrainer on chat examples ({"messages": [...]}) with the loss on assistant
    tokens only; returns (trainer, the step it resumed from). The one SFT recipe: the sft stage
    and the reader stage both train through it, so they differ only in their examples."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    peft = lora_config(spec.lora, model, label) if spec.lora else None
    score_labelled_positions_only()
    args = SFTConfig(**trainer_kwargs(spec, ctx, max_length), packing=packing, assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=peft,
                         train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in train_rows]),
                         eval_dataset=Dataset.from_list([{"messages": r["messages"]} for r in val_rows]))
    resumed = train(trainer, ctx.work, label, time_limit=ctx.resources.time_limit if ctx.resources else None)
    return trainer, resumed


def last_checkpoint(work: Path) -> tuple[str | None, int]:
    """(the newest complete checkpoint folder a killed run left, its step), or (None, 0).

    The Trainer writes trainer_state.json last, and not atomically, so a checkpoint counts only
    when that file parses; a newer one a kill left half-written is removed (it is scratch), and
    the run resumes from the one before it instead of failing on every rerun."""
    folder = work / TRAINER_DIR
    found = sorted(((int(p.name.rsplit("-", 1)[1]), p) for p in folder.glob("checkpoint-*")
                    if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()), reverse=True)
    for step, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("removing %s: a checkpoint a kill left incomplete (no readable trainer_state.json)", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        return str(path), step
    return None, 0


def _progress_callback(label: str):
    """A TrainerCallback that reports through tasks/progress.py (bar, log lines, Prefect artifact)."""
    from transformers import TrainerCallback

    from tasks.core.progress import Progress

    class ProgressCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(label, state.max_steps, state.global_step)
            self.start, self.first = time.perf_counter(), None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                tokens = float(logs.get("num_tokens", 0))
                self.first = tokens if self.first is None else self.first
                rate = (tokens - self.first) / max(time.perf_counter() - self.start, 1e-9)
                self.progress.update(state.global_step, float(logs["loss"]), rate)

        def on_train_end(self, args, state, control, **kwargs):
            self.progress.close()

    return ProgressCallback()


def _time_limit_callback(limit_s: float | None):
    """A TrainerCallback that, once `limit_s` seconds of training have passed, has the trainer save
    a checkpoint and stop at the end of the current optimizer step; `stopped_at` records the step.

    Checked in on_step_end, which runs before the trainer's own save check of the same step, so
    the checkpoint holds the step just finished."""
    from transformers import TrainerCallback

    class TimeLimitCallback(TrainerCallback):
        stopped_at: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.deadline = Deadline(limit_s)  # the clock starts with training, not with the stage

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps and self.deadline.passed():
                control.should_save = control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    return TimeLimitCallback()


def train(trainer, work: Path, label: str, time_limit: float | None = None) -> int:
    """Runs the trainer, resuming from a checkpoint of a killed or stopped run; returns the step
    resumed from. Raises TimeLimitReached (after a checkpoint) when `time_limit` seconds pass."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # One progress display: ours (a bar on a terminal, log lines in a log file), not a printed dict per step.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(label))
    limit = _time_limit_callback(time_limit)
    trainer.add_callback(limit)
    checkpoint, step = last_checkpoint(work)
    trainer.train(resume_from_checkpoint=checkpoint)
    if limit.stopped_at is not None:
        raise TimeLimitReached(label, time_limit, limit.stopped_at, trainer.state.max_steps)
    return step


def save_models(model, tokenizer, out: Path, lora: bool) -> dict[str, Any]:
    """The adapter (with LoRA) in out/adapter and a merged model in out/model; returns lineage facts."""
    if lora:
        model.save_pretrained(str(out / "adapter"))
        _reproducible_adapter(out / "adapter")
        model = model.merge_and_unload()
    Model.save(out, model, tokenizer)
    return {"adapters_merged": lora, "adapter": "adapter" if lora else None, "model": Model.FOLDER}


def _reproducible_adapter(folder: Path) -> None:
    """Makes equal adapters equal bytes: PEFT writes the base model's absolute path (a folder in
    whichever store built it) and target_modules in set order. The base is in lineage.json; the
    model card PEFT adds is a template naming the same path."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = None
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "README.md").unlink(missing_ok=True)


def history(trainer, key: str) -> list[float]:
    """Every logged value of one training metric, in order."""
    return [row[key] for row in trainer.state.log_history if key in row]


def write_history(trainer, path: Path) -> None:
    """The trainer's loss curve as CSV (step, train_loss, val_loss), like pretrain's."""
    with path.open("w", encoding="utf-8") as f:
        f.write("step,train_loss,val_loss\n")
        for row in trainer.state.log_history:
            if "loss" in row or "eval_loss" in row:
                f.write(f"{row.get('step', '')},{row.get('loss', '')},{row.get('eval_loss', '')}\n")


def tokens_per_second(trainer, tokens: int) -> float:
    """Training tokens (examples x epochs, after packing) over the trainer's measured runtime."""
    runtime = next((row["train_runtime"] for row in reversed(trainer.state.log_history) if "train_runtime" in row), None)
    return tokens / runtime if runtime else 0.0


def publish_supervised(trainer, tokenizer, spec: FinetuneSpec, out: Path, base: Model) -> dict[str, Any]:
    """After a supervised run (its greedy checks done: saving merges LoRA): the model saved with
    its loss curve and lineage; the metrics every stage of the SFT recipe reports."""
    # None when no validation example kept an assistant token within max_length (TRL then
    # evaluates nothing and reports no loss); the stage's other metrics still stand.
    val_loss = trainer.evaluate().get("eval_loss")
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) * spec.epochs
    lineage = save_models(trainer.model, tokenizer, out, lora=spec.lora is not None)
    write_history(trainer, out / Model.CURVE)
    (out / "lineage.json").write_text(json.dumps({**lineage, "base_model": f"{base.stage} artifact {base.fingerprint}"},
                                                 indent=2))
    return {"train_loss_final": history(trainer, "loss")[-1], "val_loss_final": val_loss,
            "tokens_per_s": tokens_per_second(trainer, tokens), "tokens": tokens, "steps": trainer.state.global_step}
