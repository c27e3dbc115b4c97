"""The two generators of the 2x2: the fine-tuned model and the rag generator, loaded once each,
on the device the eval stage was planned for, and described for the report's design table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_specs.errors import InputError
from data_specs.schema import EvalSpec
from eval.arms import ARMS, CONTEXTS
from tasks.core.artifacts import Model
from tasks.core.stage import RunContext
from tasks.train.loading import load_causal_lm, load_tokenizer


class Generators:
    """`get("finetuned" | "rag")` -> (model, tokenizer), loaded on first use."""

    def __init__(self, cfg: EvalSpec, finetuned: Model, reader: Model, ctx: RunContext):
        self.cfg, self.finetuned, self.reader, self.ctx = cfg, finetuned, reader, ctx
        self._loaded: dict[str, tuple[Any, Any]] = {}

    def rag_folder(self) -> Path | None:
        """The folder of the rag generator when it is not the reader: pretrain.from or a path."""
        choice = self.cfg.rag_generator
        if choice == "reader":
            return None
        if choice == "base":
            base = self.ctx.fields.get("pretrain.from")
            if not base:
                raise InputError(f"{self.ctx.spec_path}: eval.rag_generator is `base`, the pretrain.from checkpoint, "
                                 "but this spec trains from scratch: use `reader` or a model folder")
            return Path(base)
        return self.ctx.spec_path.parent / choice if not Path(choice).is_absolute() else Path(choice)

    def get(self, which: str) -> tuple[Any, Any]:
        if which not in self._loaded:
            self._loaded[which] = self._load(which)
        return self._loaded[which]

    def _load(self, which: str) -> tuple[Any, Any]:
        folder = self.rag_folder() if which == "rag" else None
        if folder is None:
            model, tokenizer = (self.finetuned if which == "finetuned" else self.reader).load(self.ctx.trust_remote_code)
        else:
            field = "eval.rag_generator"
            model = load_causal_lm(folder, trust_remote_code=self.ctx.trust_remote_code, field=field)
            tokenizer = load_tokenizer(folder, trust_remote_code=self.ctx.trust_remote_code, field=field)
            if tokenizer.chat_template is None:
                raise InputError(f"{field}: {folder} has no chat template: every arm asks through one template, so "
                                 "the rag generator must be a chat model")
        return model.to(self.ctx.device), tokenizer

    def describe(self, which: str) -> tuple[str, str]:
        """(model, what it was trained on) of a generator, for the design table."""
        if which == "finetuned":
            return _artifact(self.finetuned), self.finetuned.metrics.get("trained_on", "–")
        folder = self.rag_folder()
        if folder is None:
            return _artifact(self.reader), self.reader.metrics.get("trained_on", "–")
        source = "pretrain.from" if self.cfg.rag_generator == "base" else "eval.rag_generator"
        return f"{folder.name} ({source})", "as given: not trained by this run"

    def design(self, cfg: EvalSpec) -> list[dict[str, str]]:
        """One row per arm: its role, generator, training data and context."""
        rows = []
        for name in cfg.arms:
            arm = ARMS[name]
            model, trained = self.describe(arm.generator) if arm.generator else ("none", "–")
            context = CONTEXTS[arm.context] + (f" (k={cfg.k}, {cfg.retrieval}, as many as fit)"
                                               if arm.context == "retrieved" else "")
            if name == "rag-extractive":
                context = f"the sentence of the top-{cfg.k} passages closest to the question (MiniLM)"
            rows.append({"arm": name, "role": arm.role, "model": model, "trained_on": trained, "context": context})
        return rows


def _artifact(model: Model) -> str:
    return f"{model.stage} artifact {model.fingerprint}"
