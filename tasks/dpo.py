"""dpo: direct preference optimisation of the SFT model: right answers over its own wrong ones.

Reads:   a model (the SFT one) and Q&A pairs (the train split, without paraphrases).
Writes:  preferences.jsonl (prompt, chosen, rejected, how the rejected answer was made, the SFT
         answer's F1), adapter/ (with LoRA), model/ (merged), lineage.json.
Metrics: reward_accuracy_final, reward_margin_final, reward_margin_initial, loss_final,
         pairs, rejected_by_source, resumed_from_step.
Alone:   gristmill run SPEC --only dpo

Preference pairs: the prompt is the question (the eval prompt template, closed book); chosen is
the reference answer; rejected is the SFT model's own greedy answer when its token F1 to the
reference is below `rejected_f1_threshold`, else the answer of another question, from the
same document when there is one. TRL's DPOTrainer; with LoRA the reference model is the SFT
model with the adapter disabled (no second copy in memory). Its fused LM head scores only the
completion positions on CPU too, as sft's does (bench/dpo_speed.py measures what that buys).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from data_specs.schema import DPOSpec
from eval.generate import generate
from eval.metrics import token_f1
from eval.prompts import chat
from tasks.core.artifacts import Model, Pairs
from tasks.core.jsonl import write_jsonl
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.train.finetune import (
    finetune_resolution,
    history,
    lora_config,
    save_models,
    score_labelled_positions_only,
    train,
    trainer_kwargs,
    write_history,
)

# Final / initial values of noisy per-step logs: the mean over this share of the steps at each end.
WINDOW = 0.2


def preference_pairs(cfg: DPOSpec, pairs: list[dict], own: list[str]) -> list[dict[str, Any]]:
    """One preference pair per train pair (see the module docstring for the rejected answer)."""
    rng = random.Random(cfg.seed)
    by_doc: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_doc[p["doc_id"]].append(p)
    out = []
    for pair, answer in zip(pairs, own):
        f1 = token_f1(answer, [pair["answer"]])
        if answer.strip() and f1 < cfg.rejected_f1_threshold:
            rejected, source = answer, "sft_answer"
        else:
            same = [p["answer"] for p in by_doc[pair["doc_id"]] if p["answer"] != pair["answer"]]
            if same:
                rejected, source = rng.choice(same), "same_document_answer"
            else:
                others = [p for p in rng.sample(pairs, min(len(pairs), 8)) if p["answer"] != pair["answer"]]
                if not others:
                    continue
                rejected, source = others[0]["answer"], "other_document_answer"
        out.append({"id": pair["id"], "prompt": chat(pair["question"]), "chosen": pair["answer"],
                    "rejected": rejected, "rejected_source": source, "sft_answer_f1": round(f1, 4)})
    return out


def _window_mean(values: list[float], last: bool) -> float | None:
    if not values:
        return None
    n = max(1, round(WINDOW * len(values)))
    return mean(values[-n:] if last else values[:n])


@dataclass(frozen=True)
class DPOInputs:
    model: Model
    pairs: Pairs


def build(cfg: DPOSpec, inputs: DPOInputs, out: Path, ctx: RunContext) -> Metrics:
    """Builds the preference pairs and trains with TRL's DPOTrainer."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = inputs.model.load(ctx.trust_remote_code)
    max_length = cfg.max_length or model.config.max_position_embeddings
    pairs = inputs.pairs.train(originals_only=True)
    if cfg.max_pairs is not None and len(pairs) > cfg.max_pairs:
        pairs = random.Random(cfg.seed).sample(pairs, cfg.max_pairs)
    own = [g.text for g in generate(model, tokenizer, [chat(p["question"]) for p in pairs], cfg.max_new_tokens)]
    prefs = preference_pairs(cfg, pairs, own)
    write_jsonl(out / "preferences.jsonl", prefs)

    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in prefs])
    peft = lora_config(cfg.lora, model, "dpo") if cfg.lora else None
    score_labelled_positions_only()  # as sft: on CPU too, the LM head projects only the completions' positions
    args = DPOConfig(**trainer_kwargs(cfg, ctx, max_length), beta=cfg.beta, loss_type=[cfg.loss_type])
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)
    resumed = train(trainer, ctx.work, "dpo", time_limit=ctx.resources.time_limit)

    lineage = save_models(trainer.model, tokenizer, out, lora=cfg.lora is not None)
    write_history(trainer, out / Model.CURVE)
    lineage.update({"base_model": f"{inputs.model.stage} artifact {inputs.model.fingerprint}",
                    "reference_model": "the sft model with the adapter disabled" if cfg.lora else
                    "a frozen copy of the sft model"})
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2))
    accuracies, margins = history(trainer, "rewards/accuracies"), history(trainer, "rewards/margins")
    return {"reward_accuracy_final": _window_mean(accuracies, last=True),
            "reward_margin_final": _window_mean(margins, last=True),
            "reward_margin_initial": _window_mean(margins, last=False),
            "loss_final": _window_mean(history(trainer, "loss"), last=True),
            "pairs": len(prefs), "rejected_by_source": dict(Counter(r["rejected_source"] for r in prefs)),
            "resumed_from_step": resumed, "steps": trainer.state.global_step, "lora": cfg.lora is not None,
            "lineage": lineage,
            "trained_on": f"{inputs.model.metrics.get('trained_on', inputs.model.stage)}; then DPO on {len(prefs)} "
                          f"closed-book preference pairs x {cfg.epochs:g} epochs"}


STAGE = Stage("dpo", build, output=Model, inputs=DPOInputs, section="dpo", gpu=True, resolve=finetune_resolution,
              libs=("accelerate",))
