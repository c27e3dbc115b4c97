"""Fine-tuning throughput: SFT with packing vs without, and DPO step time vs SFT step time.

1. SFT tokens/s (real, non-padding tokens) with best-fit packing vs padded batches, same
   model, same examples, one epoch each.
2. DPO step time / SFT step time on the same batch (same prompts and chosen answers; DPO adds
   the rejected answers and the reference forward passes). FLOP ratio: SFT = fwd+bwd on one
   sequence (3 units); DPO = fwd+bwd on chosen and rejected (6) + reference fwd on both (2)
   = 8 units, so 8/3 = 2.67; the goal is <= 2.7. Both full fine-tuning, no LoRA.

    .venv/bin/python bench/finetune.py          # CPU, a few minutes on 2 cores

Last line: ratio=X.XX (DPO step time / SFT step time).
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from data_specs.schema import MODEL_PRESETS
from tasks.tokenizer import train_bpe

WORDS = "the a of list item value index return insert sorted key module function call object type".split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."


def setup(preset: str, n: int, seed: int = 0):
    """(tokenizer, model factory, examples): a BPE on synthetic text and Q&A of varied length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    qa = [(sentence(rng, 4, 12) + "?", sentence(rng, 2, 40)) for _ in range(n)]
    tokenizer = train_bpe([q + " " + a for q, a in qa] * 3, vocab_size=512, min_frequency=2)
    d = MODEL_PRESETS[preset]

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=576, hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                          num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                          max_position_embeddings=d["context"], tie_word_embeddings=True,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)

    return tokenizer, model, qa


def common(work: Path, batch: int, context: int, **extra) -> dict:
    return dict(output_dir=str(work), per_device_train_batch_size=batch, learning_rate=1e-4, report_to="none",
                save_strategy="no", logging_steps=10_000, use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                disable_tqdm=True, max_length=context, seed=0, **extra)


def sft_run(tokenizer, make_model, qa, packing: bool, batch: int, context: int, max_steps: int = -1) -> tuple[float, float, int]:
    """(real tokens/s, seconds per step, steps) of one SFT run."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa])
    with tempfile.TemporaryDirectory() as work:
        args = SFTConfig(**common(Path(work), batch, context, num_train_epochs=1, max_steps=max_steps),
                         packing=packing, assistant_only_loss=True)
        trainer = SFTTrainer(model=make_model(), args=args, train_dataset=data, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
        steps = trainer.state.global_step
        real = sum(len(x) for x in trainer.train_dataset["input_ids"])
        if max_steps > 0:  # only part of the data was seen
            real = real * min(1.0, steps * batch / len(trainer.train_dataset))
    return real / elapsed, elapsed / steps, steps


def dpo_step_time(tokenizer, make_model, qa, batch: int, context: int, steps: int) -> float:
    """Seconds per DPO step on batches of (prompt, chosen, rejected)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rng = random.Random(1)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
                               "rejected": [{"role": "assistant", "content": rng.choice(qa)[1]}]} for q, a in qa])
    with tempfile.TemporaryDirectory() as work:
        args = DPOConfig(**common(Path(work), batch, context, max_steps=steps), beta=0.1)
        # Full fine-tuning: the reference is a frozen copy of the same initial model (no LoRA).
        trainer = DPOTrainer(model=make_model(), ref_model=make_model(), args=args, train_dataset=data,
                             processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / trainer.state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano", choices=sorted(MODEL_PRESETS), help="model size preset")
    parser.add_argument("--examples", type=int, default=512, help="synthetic Q&A examples")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--steps", type=int, default=20, help="steps timed for the step-time ratio")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    context = MODEL_PRESETS[args.preset]["context"]
    tokenizer, make_model, qa = setup(args.preset, args.examples)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} preset={args.preset} examples={args.examples} batch={args.batch} threads={torch.get_num_threads()}")

    packed, _, packed_steps = sft_run(tokenizer, make_model, qa, True, args.batch, context)
    padded, _, padded_steps = sft_run(tokenizer, make_model, qa, False, args.batch, context)
    print(f"sft packed: {packed:,.0f} real tokens/s ({packed_steps} steps); padded: {padded:,.0f} real tokens/s "
          f"({padded_steps} steps); packing speed-up x{packed / padded:.2f}")

    # Same batches for both: unpacked prompt+chosen for SFT, the same plus rejected for DPO.
    sft_times = [sft_run(tokenizer, make_model, qa, False, args.batch, context, max_steps=args.steps)[1] for _ in range(2)]
    dpo_times = [dpo_step_time(tokenizer, make_model, qa, args.batch, context, args.steps) for _ in range(2)]
    sft_t, dpo_t = min(sft_times), min(dpo_times)
    print(f"step time: sft {sft_t * 1000:.0f} ms, dpo {dpo_t * 1000:.0f} ms (best of 2, {args.steps} steps each; FLOP ratio 2.67)")
    print(f"ratio={dpo_t / sft_t:.2f}")


if __name__ == "__main__":
    main()
