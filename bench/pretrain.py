"""Pretrain throughput: our training loop vs a minimal hand-written PyTorch loop, same run.

Both train the same Llama (same init, dims, batch, sequence length, dtype) on the same random
token blocks for the same number of optimizer steps; runs are interleaved (ours, plain, ours,
plain, ...) and each side's best tokens/s is kept, so machine noise hits both alike. Our loop
does its real work per step (LR schedule, accumulation, clipping, loss bookkeeping, progress);
its validation passes are not counted in its tokens/s, as the plain loop has none.

    .venv/bin/python bench/pretrain.py                 # CPU, ~1-2 minutes on 2 cores
    .venv/bin/python bench/pretrain.py --device cuda --preset gpt2-small --seq 1024   # GPU: adds MFU

Last line: ratio=X.XX (ours / plain tokens/s; the goal is >= 0.9).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from data_specs.schema import MODEL_PRESETS, OptimSpec
from tasks.train.loop import Dist, flops_per_token, mfu, param_groups, train_loop


def make_model(preset: str, seq: int, vocab: int, device: torch.device) -> torch.nn.Module:
    """A seeded Llama of a preset's dimensions (the same weights every call)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = MODEL_PRESETS[preset]
    config = LlamaConfig(vocab_size=vocab, hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                         num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                         num_key_value_heads=d["kv_heads"], max_position_embeddings=seq, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def plain_loop(model: torch.nn.Module, data: torch.Tensor, steps: int, micro: int, accum: int,
               device: torch.device, spec: OptimSpec) -> float:
    """The baseline: forward, backward, clip, AdamW step. Returns tokens/s."""
    opt = torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas,
                            fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    start = time.perf_counter()
    i = 0
    for _ in range(steps):
        for _ in range(accum):
            batch = data[(torch.arange(micro) + i) % len(data)].to(device)
            i += micro
            with autocast:
                loss = model(input_ids=batch, labels=batch).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * accum * micro * data.shape[1] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", default="nano", choices=sorted(MODEL_PRESETS), help="model size preset")
    parser.add_argument("--seq", type=int, default=256, help="sequence length, tokens")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size, tokens")
    parser.add_argument("--micro", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop (best is kept)")
    args = parser.parse_args()
    logging.getLogger("gristmill").setLevel(logging.WARNING)

    device = torch.device(args.device)
    batch_tokens = args.micro * args.seq * args.accum
    spec = OptimSpec(tokens=args.steps * batch_tokens, batch_tokens=batch_tokens, micro_batch=args.micro,
                     eval_every=10**9, eval_blocks=1, checkpoint_every=10**9, warmup_fraction=0.0)
    data = torch.randint(0, args.vocab, (max(64, args.micro * args.accum * 4), args.seq))
    val = data[:1]
    print(f"device={device} preset={args.preset} seq={args.seq} micro={args.micro} accum={args.accum} "
          f"steps={args.steps} batch_tokens={batch_tokens} threads={torch.get_num_threads()}")

    ours, plain = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as work:
            model = make_model(args.preset, args.seq, args.vocab, device)
            metrics = train_loop(model, data, val, spec, Path(work), device, Dist(), label="bench").metrics
        ours.append(metrics["tokens_per_s"])
        model = make_model(args.preset, args.seq, args.vocab, device)
        plain.append(plain_loop(model, data, args.steps, args.micro, args.accum, device, spec))
        print(f"run {r + 1}: ours {ours[-1]:,.0f} tokens/s, plain {plain[-1]:,.0f} tokens/s")

    best_ours, best_plain = max(ours), max(plain)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters={n_params:,} flops/token={flops_per_token(model, args.seq):,.0f}")
    print(f"ours  best {best_ours:,.0f} tokens/s")
    print(f"plain best {best_plain:,.0f} tokens/s")
    if device.type == "cuda":
        print(f"mfu ours={mfu(best_ours, model, args.seq, device, 1):.3f} plain={mfu(best_plain, model, args.seq, device, 1):.3f} "
              f"({torch.cuda.get_device_name(device)})")
    print(f"ratio={best_ours / best_plain:.2f}")


if __name__ == "__main__":
    main()
