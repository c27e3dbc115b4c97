"""tokenizer: a byte-level BPE trained on the deduped corpus, or an existing tokenizer used as is.

Reads:   documents (the corpus), or the folder `tokenizer.from` names. When pretrain warm-starts
         from another run (`pretrain.from: {run: NAME}`), the model it resolved to (ctx.start)
         and not the corpus: its tokenizer is copied, so token ids keep their meaning, and the
         key holds that model's fingerprint instead of the corpus's.
Writes:  tokenizer/, a `PreTrainedTokenizerFast` folder (save_pretrained) with the chat special
         tokens and a ChatML chat template, loadable with plain `AutoTokenizer.from_pretrained`.
Metrics: vocab_size, documents, chars, tokens (of the corpus), chars_per_token, trained; for a
         warm start vocab_size, trained (false) and copied_from.
Alone:   gristmill run SPEC --only tokenizer

The chat template marks assistant turns with {% generation %} so TRL can train on assistant
tokens only. `<|endoftext|>` separates documents when they are packed for pre-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_specs.errors import InputError
from data_specs.schema import TokenizerSpec
from tasks.core.artifacts import Documents, Model, Tokenizer
from tasks.core.stage import Metrics, RunContext, Stage
from tasks.train.loading import load_tokenizer

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_tokenizer_folder(path: Path, trust_remote_code: bool):
    """A tokenizer folder loaded with plain transformers; an unloadable one is bad input."""
    if not path.is_dir():
        raise InputError(f"tokenizer.from: {path} is not a folder")
    return load_tokenizer(path, trust_remote_code=trust_remote_code, field="tokenizer.from")


def train_bpe(texts, vocab_size: int, min_frequency: int):
    """A byte-level BPE over `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = BPETokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                  model_max_length=1_000_000)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass(frozen=True)
class TokenizerInputs:
    documents: Documents | None = None  # None in a warm start (Stage.unread_when_started)


def copy_started(start: Model, out: Path, trust_remote_code: bool) -> Metrics:
    """A warm start's tokenizer: the one saved with the model it starts from, as it is."""
    tok = load_tokenizer(start.folder, trust_remote_code=trust_remote_code)
    tok.save_pretrained(str(Tokenizer.folder_in(out)))
    return {"vocab_size": len(tok), "trained": False,
            "copied_from": f"{start.stage} artifact {start.fingerprint} of run {start.record.run_name}"}


def build(cfg: TokenizerSpec, inputs: TokenizerInputs, out: Path, ctx: RunContext) -> Metrics:
    """Trains (or copies) the tokenizer and measures it on the corpus."""
    if ctx.start is not None:
        return copy_started(ctx.start, out, ctx.trust_remote_code)
    if cfg.from_:
        tok = load_tokenizer_folder(cfg.from_, ctx.trust_remote_code)
        if tok.chat_template is None:
            tok.chat_template = CHAT_TEMPLATE
    else:
        tok = train_bpe((d["text"] for d in inputs.documents), cfg.vocab_size, cfg.min_frequency)
    tok.save_pretrained(str(Tokenizer.folder_in(out)))
    chars = tokens = documents = 0
    for d in inputs.documents:
        documents += 1
        chars += len(d["text"])
        tokens += len(tok(d["text"], add_special_tokens=False)["input_ids"])
    return {"vocab_size": len(tok), "documents": documents, "chars": chars, "tokens": tokens,
            "chars_per_token": round(chars / max(tokens, 1), 3), "trained": cfg.from_ is None}


STAGE = Stage("tokenizer", build, output=Tokenizer, inputs=TokenizerInputs, section="tokenizer",
              start_from="pretrain.from", unread_when_started=("documents",))
