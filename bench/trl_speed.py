"""TRL's SFT step against a plain PyTorch loop on the same model, batches and loss.

The examples look like the reader's and sft's grounded ones: a long prompt (passages and a
question, ~150 words) and a short answer (2-12 words), the loss on the answer only. The model is
the demo's nano Llama with the demo's 8,192-token vocabulary (fresh seeded init, fp32).

Rows, each timed over the same number of steps of the same batches (batch 16, padded):
- trl default: SFTTrainer as TRL configures it (gradient checkpointing on; on CPU its fused LM
  head scores every position, labelled or not).
- trl, no checkpointing: gradient_checkpointing=False.
- trl as gristmill runs it: no checkpointing on CPU, and the fused head scoring only the
  labelled positions (tasks/train/finetune.py: score_labelled_positions_only).
- plain loop, full logits: the trainer's own collated batches, AdamW, forward, cross-entropy on
  the answer tokens through the full logits (what a plain loop usually computes), backward, step.
- plain loop, labelled positions: the same, with the LM head applied only to the positions
  whose next token is in the loss: the baseline the ratio is taken against.

    .venv/bin/python bench/trl_speed.py          # CPU, ~3 minutes on 2 cores

Last line: ratio=X.XX (trl as gristmill runs it, tokens/s ÷ the labelled-positions plain loop's).
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from machine import describe  # bench/machine.py

from data_specs.schema import MODEL_PRESETS
from tasks.core.allocator import keep_freed_memory
from tasks.core.keys import native_bf16
from tasks.tokenizer import train_bpe

WORDS = ("the a of list item value index return insert sorted key module function call object type class "
         "method argument default raise error file path string bytes number").split()


def examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [(f"Passages:\n[1] {words(50, 70)}\n[2] {words(50, 70)}\nQuestion: {words(6, 12)}?", words(2, 12) + ".")
            for _ in range(n)]


def setup(preset: str, n: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    qa = examples(n)
    tokenizer = train_bpe([q + " " + a for q, a in qa[:200]], vocab_size=512, min_frequency=2)
    d = MODEL_PRESETS[preset]

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                          num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                          num_key_value_heads=d["kv_heads"], max_position_embeddings=d["context"],
                          tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)

    return tokenizer, model, qa


def trainer(tokenizer, model, qa, work: Path, batch: int, steps: int, checkpointing: bool, bf16: bool):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in qa])
    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=str(work), per_device_train_batch_size=batch, learning_rate=1e-3, report_to="none",
                     save_strategy="no", logging_steps=1, use_cpu=not cuda, bf16=bf16, disable_tqdm=True,
                     max_length=model.config.max_position_embeddings, seed=0, max_steps=steps, packing=False,
                     assistant_only_loss=True, gradient_checkpointing=checkpointing, dataloader_num_workers=0)
    from transformers import PrinterCallback

    t = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    t.remove_callback(PrinterCallback)  # one dict per step on stdout
    return t


@contextmanager
def fused_head(compact: bool) -> Iterator[None]:
    """TRL's fused LM head as TRL sets it, or (`compact`) scoring only the labelled positions as
    gristmill's stages do; TRL's own rule is back after."""
    import trl.trainer.utils as fused

    original = fused._use_triton
    if compact:
        from tasks.train.finetune import score_labelled_positions_only

        score_labelled_positions_only()
    try:
        yield
    finally:
        fused._use_triton = original


def train_seconds(t) -> float:
    start = time.perf_counter()
    t.train()
    return time.perf_counter() - start


def trl_run(tokenizer, make_model, qa, batch: int, steps: int, checkpointing: bool, compact: bool,
            bf16: bool) -> float:
    """Real (non-padding) tokens/s of `steps` TRL steps."""
    with fused_head(compact), tempfile.TemporaryDirectory() as work:
        t = trainer(tokenizer, make_model(), qa, Path(work), batch, steps, checkpointing, bf16)
        elapsed = train_seconds(t)
        seen = [len(x) for x in t.train_dataset["input_ids"]][: steps * batch]  # no shuffle beyond epoch 1
        tokens = sum(seen) if steps * batch <= len(t.train_dataset) else sum(seen) * steps * batch / len(seen)
    return tokens / elapsed


def plain_run(tokenizer, make_model, qa, batch: int, steps: int, labelled_only: bool, bf16: bool) -> float:
    """Real tokens/s of a plain loop over the batches TRL's collator makes."""
    with tempfile.TemporaryDirectory() as work:
        t = trainer(tokenizer, make_model(), qa, Path(work), batch, steps, False, False)
        batches = [b for _, b in zip(range(steps), t.get_train_dataloader())]
    model = make_model().train()
    return plain_loop(model, batches, lambda b: _plain_loss(model, b, b["labels"][:, 1:], labelled_only), 1e-3, bf16)


def plain_loop(model, batches: list[dict], loss_of: Callable[[dict], torch.Tensor], lr: float, bf16: bool) -> float:
    """Real tokens/s of a plain training loop: per batch, `loss_of(batch)` under autocast (bf16
    when asked), backward, clip to 1, AdamW step. The baseline of both TRL benchmarks."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)
    tokens = 0
    start = time.perf_counter()
    for b in batches:
        with autocast:
            loss = loss_of(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def _plain_loss(model, b, labels, labelled_only: bool):
    if labelled_only:
        hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        keep = labels != -100
        return torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), labels[keep])
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                             ignore_index=-100)


def arguments(doc: str, batch: str) -> argparse.Namespace:
    """The options of the TRL benchmarks (this one and bench/dpo_speed.py); quiets the libraries."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano", choices=sorted(MODEL_PRESETS), help="model size preset")
    parser.add_argument("--vocab", type=int, default=8192, help="the model's vocabulary (the demo's: 8192)")
    parser.add_argument("--batch", type=int, default=16, help=batch)
    parser.add_argument("--steps", type=int, default=20, help="steps timed per row")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row, interleaved; the best is kept")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    return args


def best_rates(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """The best tokens/s of each row over `repeats` rounds, interleaved, so a burst of load hits
    every row alike."""
    best = {name: 0.0 for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    return best


def print_rates(rows: dict[str, float], baseline: str, called: str) -> None:
    """A line per row, its tokens/s against the baseline row's, then the ratio line of gristmill's row."""
    width = max(map(len, rows)) + 1
    for name, rate in rows.items():
        print(f"{name:<{width}} {rate:>8,.0f} real tokens/s   x{rate / rows[baseline]:.2f} of {called}")
    print(f"ratio={rows['trl as gristmill runs it'] / rows[baseline]:.2f}")


def main() -> None:
    args = arguments(__doc__, "examples per step (the demo's sft.batch_size)")
    tokenizer, make_model, qa = setup(args.preset, args.batch * (args.steps + 1), args.vocab)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keep_freed_memory()  # as every stage build does (tasks/core/runner.py)
    bf16 = native_bf16(device)  # as tasks/train/finetune.py resolves it; the plain loops use the same
    print(describe())
    print(f"device={device} preset={args.preset} vocab={args.vocab} batch={args.batch} steps={args.steps} "
          f"precision={'bf16' if bf16 else 'fp32'} (gristmill's row and the plain loops; TRL's defaults: "
          f"{'bf16' if device == 'cuda' else 'fp32'})")
    n, b = args.steps, args.batch
    runs = {
        "plain loop, full logits": lambda: plain_run(tokenizer, make_model, qa, b, n, False, bf16),
        "plain loop, labelled positions": lambda: plain_run(tokenizer, make_model, qa, b, n, True, bf16),
        "trl default": lambda: trl_run(tokenizer, make_model, qa, b, n, True, False, device == "cuda"),
        "trl, no checkpointing": lambda: trl_run(tokenizer, make_model, qa, b, n, False, False, device == "cuda"),
        "trl as gristmill runs it": lambda: trl_run(tokenizer, make_model, qa, b, n, device == "cuda", True, bf16),
    }
    print_rates(best_rates(runs, args.repeats), "plain loop, labelled positions", "the labelled-positions loop")


if __name__ == "__main__":
    main()
