"""pretrain: a Llama-architecture causal LM, trained from scratch or continued from a checkpoint.

Reads:   the dedup artifact's documents/ and the tokenizer artifact (or `pretrain.from`, a
         local HF checkpoint folder, whose content enters the cache key).
Writes:  model.safetensors + config.json + the tokenizer (loadable with plain
         `AutoModelForCausalLM.from_pretrained(path)`), and loss_curve.csv.
Metrics: val_loss_initial, val_loss_final, val_perplexity_final, tokens_seen, tokens_per_s,
         mfu (GPU only, else null), wall_s, peak_memory_mb, resumed_from_step, ...
Alone:   gristmill run SPEC --only pretrain

Documents are split by document into train/validation, tokenized, and packed into blocks
of `context` tokens with EOS between documents. A killed run, or one stopped by its time
limit (`resources.pretrain.time_limit`), resumes from the checkpoint in the stage's work
folder. With `resources.pretrain.gpus > 1` the loop runs in that many torchrun processes
(DDP or FSDP, tasks/distributed.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_specs.spec import PretrainSpec, RunSpec
from tasks.distributed import run_or_launch
from tasks.documents import iter_documents
from tasks.errors import InputError
from tasks.lm_data import packed_splits
from tasks.loading import load_causal_lm, load_tokenizer
from tasks.stage import Inputs, Metrics, Stage, content_digest
from tasks.training import Dist, check_time_limit, pick_device, save_trained, train_loop

VOCAB_MULTIPLE = 64  # embedding rows rounded up: faster matmuls, room for added tokens


def load_checkpoint(path: Path, trust_remote_code: bool):
    """A local HF causal-LM checkpoint, safetensors only; anything else is bad input."""
    if not (path / "config.json").is_file():
        raise InputError(f"pretrain.from: {path} is not a model checkpoint (no config.json)")
    return load_causal_lm(path, trust_remote_code=trust_remote_code, field="pretrain.from",
                          what="loadable checkpoint", dtype=torch.float32)


def new_model(spec: PretrainSpec, tokenizer) -> torch.nn.Module:
    """A freshly initialised Llama of the spec's dimensions (seeded)."""
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


def make_model(spec: RunSpec, tokenizer) -> tuple[torch.nn.Module, int]:
    """(model, block length): continued from `pretrain.from`, or new from the spec's dimensions."""
    cfg = spec.pretrain
    if not cfg.from_:
        return new_model(cfg, tokenizer), cfg.model.dims()["context"]
    path = spec.resolve(cfg.from_)
    model = load_checkpoint(path, spec.trust_remote_code)
    if len(tokenizer) > model.config.vocab_size:
        raise InputError(f"pretrain.from: {path} has {model.config.vocab_size} embedding rows but the tokenizer "
                         f"has {len(tokenizer)} tokens; use the checkpoint's own tokenizer (tokenizer.from)")
    block = min(cfg.model.dims()["context"], getattr(model.config, "max_position_embeddings", 10**9))
    return model, block


def run(spec: RunSpec, inputs: Inputs, out: Path, work: Path, dist: Dist) -> Metrics:
    """The work of one process: data, model, loop; the main process saves the artifact."""
    tokenizer = load_tokenizer(inputs["tokenizer"], trust_remote_code=spec.trust_remote_code)
    model, block = make_model(spec, tokenizer)
    train, val = packed_splits(iter_documents(inputs["dedup"] / "documents"), tokenizer, block,
                               spec.pretrain.val_fraction, spec.pretrain.seed, f"{spec.spec_path}: pretrain")
    result = train_loop(model, train, val, spec.pretrain, work, pick_device(dist), dist, label="pretrain",
                        time_limit=spec.resources.pretrain.time_limit)
    save_trained(model, tokenizer, result, out, dist)
    return result.metrics


def build(spec: RunSpec, inputs: Inputs, out: Path, work: Path) -> Metrics:
    """Trains the model and writes it with its tokenizer and loss curve."""
    return check_time_limit("pretrain", run_or_launch("pretrain", run, spec, inputs, out, work,
                                                       spec.resources.pretrain.gpus))


def external_inputs(spec: RunSpec) -> dict[str, str]:
    """The content of a `pretrain.from` checkpoint (nothing when training from scratch)."""
    return content_digest(spec, "pretrain.from", spec.pretrain.from_)


STAGE = Stage(
    name="pretrain",
    needs=("dedup", "tokenizer"),
    build=build,
    spec_view=lambda spec: {"pretrain": spec.pretrain.cache_view()},
    external_inputs=external_inputs,
    libs=("torch", "transformers"),
    module=__name__,
)
