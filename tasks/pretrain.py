"""pretrain: a Llama-architecture causal LM, trained from scratch or continued from a checkpoint.

Reads:   documents (the corpus) and a tokenizer; with `pretrain.from`, the model to continue:
         a local HF checkpoint folder (its content enters the cache key), or, for a warm start
         from a run reference ({run: NAME}), that run's newest pretrain or midtrain artifact
         (ctx.start; its fingerprint enters the key, and the tokenizer stage copied its tokenizer).
Writes:  model/ (safetensors + config + the tokenizer, loadable with plain
         `AutoModelForCausalLM.from_pretrained`), and loss_curve.csv.
Metrics: val_loss_initial, val_loss_final, val_perplexity_final, tokens_seen, tokens_per_s,
         mfu (GPU only, else null), wall_s, peak_memory_mb, resumed_from_step, started_from (a warm start), ...
Alone:   gristmill run SPEC --only pretrain

Documents are split by document into train/validation, tokenized, and packed into blocks
of `context` tokens with EOS between documents. A killed run, or one stopped by its time
limit (`resources.pretrain.time_limit`), resumes from the checkpoint in the stage's work
folder. With `resources.pretrain.gpus > 1` the loop runs in that many torchrun processes
(DDP or FSDP, tasks/distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data_specs.errors import InputError
from data_specs.schema import PretrainSpec
from tasks.core.artifacts import Documents, Model, Tokenizer
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.train.distributed import run_or_launch
from tasks.train.lm_data import holdout_fields, packed_splits, training_documents
from tasks.train.loading import load_causal_lm
from tasks.train.loop import Dist, check_time_limit, loop_resolution, pick_device, save_trained, train_loop

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (planning stays fast)
    import torch

VOCAB_MULTIPLE = 64  # embedding rows rounded up: faster matmuls, room for added tokens


def load_checkpoint(path: Path, trust_remote_code: bool):
    """A local HF causal-LM checkpoint, safetensors only; anything else is bad input."""
    import torch

    if not (path / "config.json").is_file():
        raise InputError(f"pretrain.from: {path} is not a model checkpoint (no config.json)")
    return load_causal_lm(path, trust_remote_code=trust_remote_code, field="pretrain.from",
                          what="loadable checkpoint", dtype=torch.float32)


def new_model(spec: PretrainSpec, tokenizer) -> torch.nn.Module:
    """A freshly initialised Llama of the spec's dimensions (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = spec.model.dims()
    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=d["hidden"], intermediate_size=d["intermediate"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
        max_position_embeddings=d["context"], tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def starting_point(cfg: PretrainSpec, ctx: RunContext) -> Path | None:
    """The checkpoint folder the model continues from: another run's model (a run reference that
    resolved), the `pretrain.from` folder, or None for new weights (also when a run reference fell
    back to scratch)."""
    if ctx.start is not None:
        return ctx.start.folder
    return cfg.from_ if isinstance(cfg.from_, Path) else None


def make_model(cfg: PretrainSpec, tokenizer, ctx: RunContext) -> tuple[torch.nn.Module, int]:
    """(model, block length): continued from a checkpoint (`starting_point`), or new from the spec's dimensions."""
    path = starting_point(cfg, ctx)
    if path is None:
        return new_model(cfg, tokenizer), cfg.model.dims()["context"]
    model = load_checkpoint(path, ctx.trust_remote_code)
    if len(tokenizer) > model.config.vocab_size:
        raise InputError(f"pretrain.from: {path} has {model.config.vocab_size} embedding rows but the tokenizer "
                         f"has {len(tokenizer)} tokens; use the checkpoint's own tokenizer (tokenizer.from)")
    block = min(cfg.model.dims()["context"], getattr(model.config, "max_position_embeddings", 10**9))
    return model, block


@dataclass(frozen=True)
class PretrainInputs:
    documents: Documents
    tokenizer: Tokenizer


def run(cfg: PretrainSpec, inputs: PretrainInputs, out: Path, ctx: RunContext, dist: Dist) -> Metrics:
    """The work of one process: data, model, loop; the main process saves the artifact."""
    tokenizer = inputs.tokenizer.load(ctx.trust_remote_code)
    model, block = make_model(cfg, tokenizer, ctx)
    docs, held_out = training_documents(inputs.documents, ctx.fields)
    train, val = packed_splits(docs, tokenizer, block, cfg.val_fraction, cfg.seed, f"{ctx.spec_path}: pretrain")
    result = train_loop(model, train, val, cfg, ctx.work, pick_device(ctx.device, dist), dist, label="pretrain",
                        time_limit=ctx.resources.time_limit, checkpoint_every=ctx.runtime.checkpoint_every,
                        compile_model=ctx.resolved["compile"], bf16=ctx.resolved["precision"] == "bf16-autocast")
    save_trained(model, tokenizer, result, out, dist)
    metrics = {**result.metrics, "documents": len(docs), "held_out_documents_left_out": held_out}
    if ctx.start is not None:
        metrics["started_from"] = f"{ctx.start.stage} artifact {ctx.start.fingerprint} of run {ctx.start.record.run_name}"
    return metrics


def build(cfg: PretrainSpec, inputs: PretrainInputs, out: Path, ctx: RunContext) -> Metrics:
    """Trains the model and writes it with its tokenizer and loss curve."""
    return check_time_limit("pretrain", run_or_launch("pretrain", run, cfg, inputs, out, ctx))


STAGE = Stage("pretrain", build, output=Model, inputs=PretrainInputs, section="pretrain", gpu=True,
              resolve=loop_resolution, fields_when=holdout_fields, start_from="pretrain.from")
