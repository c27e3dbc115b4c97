"""Pretrain throughput: our training loop vs a minimal hand-written PyTorch loop, same run.

Both train the same Llama (same init, dims, batch, sequence length, dtype) on the same random
token blocks for the same number of optimizer steps; runs are interleaved (ours, plain, ours,
plain, ...) and each side's best tokens/s is kept, so machine noise hits both alike. Our loop
does its real work per step (LR schedule, accumulation, clipping, loss bookkeeping, progress);
its validation passes are not counted in its tokens/s, as the plain loop has none.

Both run as the stage does: bf16 autocast where the device computes bf16 natively, and the
allocator tuned (tasks/core/allocator.py). `--settings` instead measures those two choices:
the plain loop in a fresh process per setting (the allocator is fixed at process start), fp32
and bf16, default and tuned allocator, with the share of CPU time spent in the kernel.

    .venv/bin/python bench/pretrain.py                 # CPU, ~1-2 minutes on 2 cores
    .venv/bin/python bench/pretrain.py --settings      # precision x allocator, ~2 minutes
    .venv/bin/python bench/pretrain.py --device cuda --preset gpt2-small --seq 1024   # GPU: adds MFU

Last line: ratio=X.XX (ours / plain tokens/s; the goal is >= 0.9); with --settings,
ratio=X.XX (bf16 + tuned allocator / fp32 + default allocator, the plain loop's tokens/s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe  # bench/machine.py

from data_specs.schema import MODEL_PRESETS, OptimSpec
from tasks.core.allocator import keep_freed_memory
from tasks.core.keys import native_bf16
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
               device: torch.device, spec: OptimSpec, bf16: bool) -> float:
    """The baseline: forward, backward, clip, AdamW step. Returns tokens/s."""
    opt = torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas,
                            fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
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


SETTINGS = [("fp32", "default"), ("fp32", "tuned"), ("bf16", "default"), ("bf16", "tuned")]


def one_setting(precision: str, allocator: str, args) -> None:
    """(In a fresh process) the plain loop's best tokens/s and kernel-time share, as JSON."""
    if allocator == "tuned":
        keep_freed_memory()
    device, spec, data = torch.device(args.device), *setup(args)[1:]
    best, kernel = 0.0, 0.0
    for _ in range(args.repeats):
        before = os.times()
        rate = plain_loop(make_model(args.preset, args.seq, args.vocab, device), data, args.steps, args.micro,
                          args.accum, device, spec, precision == "bf16")
        after = os.times()
        cpu = (after.user - before.user) + (after.system - before.system)
        if rate > best:
            best, kernel = rate, (after.system - before.system) / max(cpu, 1e-9)
    print(json.dumps({"tokens_per_s": best, "kernel": kernel}))


def settings_table(args) -> None:
    """Each setting in its own process, interleaved twice; the best of each is kept."""
    results: dict[tuple[str, str], dict] = {}
    for _ in range(2):
        for precision, allocator in SETTINGS:
            cmd = [sys.executable, __file__, "--one-setting", f"{precision}:{allocator}", "--device", args.device,
                   "--preset", args.preset, "--seq", str(args.seq), "--steps", str(args.steps), "--repeats", "1"]
            got = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            if got["tokens_per_s"] > results.get((precision, allocator), {}).get("tokens_per_s", 0):
                results[(precision, allocator)] = got
    base = results[("fp32", "default")]["tokens_per_s"]
    print(f"{'precision':<10}{'allocator':<11}{'tokens/s':>10}{'kernel time':>13}{'vs fp32 default':>17}")
    for (precision, allocator), r in results.items():
        print(f"{precision:<10}{allocator:<11}{r['tokens_per_s']:>10,.0f}{r['kernel']:>13.0%}"
              f"{r['tokens_per_s'] / base:>17.2f}")
    print(describe())
    print(f"ratio={results[('bf16', 'tuned')]['tokens_per_s'] / base:.2f}")


def setup(args) -> tuple[int, OptimSpec, torch.Tensor]:
    batch_tokens = args.micro * args.seq * args.accum
    spec = OptimSpec(tokens=args.steps * batch_tokens, batch_tokens=batch_tokens, micro_batch=args.micro,
                     eval_every=10**9, eval_blocks=1, checkpoint_every=10**9, warmup_fraction=0.0)
    torch.manual_seed(0)
    data = torch.randint(0, args.vocab, (max(64, args.micro * args.accum * 4), args.seq))
    return batch_tokens, spec, data


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
    parser.add_argument("--settings", action="store_true", help="measure precision x allocator instead")
    parser.add_argument("--one-setting", help=argparse.SUPPRESS)  # PRECISION:ALLOCATOR, for --settings
    args = parser.parse_args()
    logging.getLogger("gristmill").setLevel(logging.WARNING)
    if args.one_setting:
        return one_setting(*args.one_setting.split(":"), args)
    print(describe())
    if args.settings:
        return settings_table(args)

    keep_freed_memory()  # as every stage build does (tasks/core/runner.py)
    device = torch.device(args.device)
    bf16 = native_bf16(device.type)
    batch_tokens, spec, data = setup(args)
    val = data[:1]
    print(f"device={device} preset={args.preset} seq={args.seq} micro={args.micro} accum={args.accum} "
          f"steps={args.steps} batch_tokens={batch_tokens} precision={'bf16-autocast' if bf16 else 'fp32'}")

    ours, plain = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as work:
            model = make_model(args.preset, args.seq, args.vocab, device)
            metrics = train_loop(model, data, val, spec, Path(work), device, Dist(), label="bench", bf16=bf16).metrics
        ours.append(metrics["tokens_per_s"])
        model = make_model(args.preset, args.seq, args.vocab, device)
        plain.append(plain_loop(model, data, args.steps, args.micro, args.accum, device, spec, bf16))
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
