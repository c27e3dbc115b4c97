"""The causal-LM training loop shared by pretrain and midtrain.

One loop, written once: AdamW, warmup then cosine or warmup-stable-decay, gradient
accumulation to a token batch, a token budget, bf16 autocast on GPU (fp32 on CPU),
periodic validation on a fixed subset, resumable checkpoints, progress, measured
throughput, and a wall-clock time limit. The data order is a pure function of (seed, step), so
a run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.

The time limit is enforced here, at step boundaries, because nothing outside can interrupt a
blocking training step cleanly (a Prefect timeout cannot). When it passes, the loop saves a
checkpoint and returns early; the stage then fails with `TimeLimitReached`, and a rerun
resumes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_specs.errors import StageError
from data_specs.schema import OptimSpec
from tasks.core.artifacts import Model
from tasks.core.keys import native_bf16
from tasks.core.progress import Progress
from tasks.core.stage import Where

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (planning stays fast)
    import torch

CHECKPOINT = "checkpoint.pt"

# Dense bf16 peak of the devices we know, in FLOP/s (vendor datasheets, without sparsity).
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly one-process) data-parallel group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # which GPU of this machine
    strategy: str = "ddp"  # "ddp" or "fsdp" when world > 1

    @property
    def fsdp(self) -> bool:
        return self.world > 1 and self.strategy == "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class LoopResult:
    """What a training run measured."""

    metrics: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)
    # The step the time limit stopped the loop at (a checkpoint holds it); None when it finished.
    stopped_at: int | None = None


TIME_LIMIT_KEY = "time_limit_reached"  # the metric a stopped loop returns instead of its results


class TimeLimitReached(StageError):
    """A training stage stopped at its time limit, after saving a checkpoint a rerun resumes from."""

    def __init__(self, label: str, limit_s: float, step: int, steps: int):
        super().__init__(f"{label} reached its time limit of {limit_s:g} s at step {step} of {steps}; "
                         f"checkpoint saved; rerun to resume")


class Deadline:
    """A wall-clock limit counted from when this object is made; a limit of None never passes."""

    def __init__(self, limit_s: float | None):
        self.limit_s, self.start = limit_s, time.monotonic()

    def passed(self) -> bool:
        return self.limit_s is not None and time.monotonic() - self.start >= self.limit_s


def check_time_limit(label: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a finished loop; raises TimeLimitReached for those of a stopped one.

    Works on metrics so it holds for torchrun runs too: they come back from the main process."""
    stop = metrics.get(TIME_LIMIT_KEY)
    if stop:
        raise TimeLimitReached(label, stop["limit_s"], stop["step"], stop["steps"])
    return metrics


def lr_at(step: int, total: int, spec: OptimSpec) -> float:
    """Learning rate of an optimizer step: linear warmup, then cosine or WSD decay to min_lr_ratio."""
    warmup = round(spec.warmup_fraction * total)
    floor = spec.lr * spec.min_lr_ratio
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    if spec.schedule == "wsd":
        decay_start = total - max(1, round(spec.decay_fraction * total))
        if step < decay_start:
            return spec.lr
        return spec.lr + (floor - spec.lr) * (step - decay_start + 1) / (total - decay_start)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (spec.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: norms, biases and other vectors are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class BatchOrder:
    """Which blocks each micro-batch reads: epoch-wise permutations seeded by (seed, epoch)."""

    def __init__(self, n_blocks: int, seed: int):
        self.n, self.seed, self._perms = n_blocks, seed, {}

    def blocks(self, first: int, count: int) -> torch.Tensor:
        import torch

        out = []
        for i in range(first, first + count):
            epoch, pos = divmod(i, self.n)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch in memory
            out.append(self._perms[epoch][pos])
        return torch.stack(out)


def evaluate(model: torch.nn.Module, val: torch.Tensor, spec: OptimSpec, micro: int, device: torch.device,
             bf16: bool = False) -> float:
    """Mean next-token loss over a fixed subset of validation blocks."""
    import torch

    with torch.no_grad():  # no autograd graph: nothing here is trained
        model.eval()
        blocks = val[: spec.eval_blocks]
        total = 0.0
        for start in range(0, len(blocks), micro):
            batch = blocks[start:start + micro].to(device)
            with _autocast(device, bf16):
                total += model(input_ids=batch, labels=batch).loss.float().item() * len(batch)
        model.train()
        return total / len(blocks)


def _autocast(device: torch.device, bf16: bool):
    """bf16 autocast where the hardware computes bf16 (loop_resolution decides), else plain fp32."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*d*T for attention (PaLM, appendix B)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def mfu(tokens_per_s: float, model: torch.nn.Module, seq_len: int, device: torch.device, world: int) -> float | None:
    """Model FLOPs utilisation against the device's bf16 dense peak; None on CPU or unknown GPUs."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else tokens_per_s * flops_per_token(model, seq_len) / (peak * world)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _full_state(model, optimizer, dist: Dist) -> tuple[dict, dict]:
    """Unsharded model and optimizer state (a collective call on every rank under FSDP)."""
    if not dist.fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _load_state(model, optimizer, state: dict, dist: Dist) -> None:
    """Loads a full checkpoint into a (possibly sharded) model and its optimizer."""
    if not dist.fsdp:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def _save_checkpoint(path: Path, model, optimizer, step: int, curve: list, tokens_seen: int, dist: Dist) -> None:
    """Atomic: written to a temp file, then renamed over the previous checkpoint (main process)."""
    import torch

    model_state, optim_state = _full_state(model, optimizer, dist)
    if not dist.main:
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model_state, "optimizer": optim_state, "step": step,
                "curve": curve, "tokens_seen": tokens_seen}, tmp)
    os.replace(tmp, path)


def export_model(model: torch.nn.Module, dist: Dist) -> torch.nn.Module | None:
    """The trained model, unsharded, on the main process (None elsewhere); collective under FSDP."""
    if not dist.fsdp:
        return model if dist.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return None
    plain = type(model)(model.config)
    plain.load_state_dict(full)
    return plain


def _reduce_step(loss_sum: float, over: bool, dist: Dist, device: torch.device) -> tuple[float, bool]:
    """(mean loss over processes, whether any process is past its time limit): one all-reduce.

    Every rank gets the same answer, so all stop at the same step boundary (a rank that stopped
    alone would leave the others waiting in a collective forever)."""
    import torch
    import torch.distributed as torch_dist

    if dist.world == 1:
        return loss_sum, over
    t = torch.tensor([loss_sum, float(over)], device=device)
    torch_dist.all_reduce(t)
    return t[0].item() / dist.world, t[1].item() > 0


def train_loop(model: torch.nn.Module, train: torch.Tensor, val: torch.Tensor, spec: OptimSpec,
               work: Path, device: torch.device, dist: Dist = Dist(), label: str = "train",
               time_limit: float | None = None, checkpoint_every: int = 50, compile_model: bool = False,
               bf16: bool = False) -> LoopResult:
    """Trains `model` in place on packed blocks for `spec.tokens` tokens; returns metrics and the curve.

    With `time_limit` (seconds, from this call), stops at the first step boundary past it with a
    checkpoint and returns a LoopResult whose `stopped_at` is set (see check_time_limit).
    `checkpoint_every` (steps) and `compile_model` (CUDA only) are the runtime settings; `bf16`
    (autocast) is what loop_resolution resolved."""
    import torch
    import torch.distributed as torch_dist

    deadline = Deadline(time_limit)
    # ---- geometry: accumulation reaches batch_tokens with micro_batch sequences per pass
    seq_len = train.shape[1]
    # Never more sequences per pass than the token batch holds (it would silently grow the batch).
    micro = max(1, min(spec.micro_batch, spec.batch_tokens // (seq_len * dist.world)))
    accum = max(1, round(spec.batch_tokens / (micro * seq_len * dist.world)))
    step_tokens = accum * micro * seq_len * dist.world
    total_steps = max(1, math.ceil(spec.tokens / step_tokens))
    order = BatchOrder(len(train), spec.seed)

    model.to(device)
    raw_model = model
    if dist.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in raw_model.model.layers:  # one shard group per decoder block, then the rest
            fully_shard(layer)
        fully_shard(raw_model)
    elif dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(raw_model, spec.weight_decay), lr=spec.lr, betas=spec.betas, fused=fused)
    if compile_model and device.type == "cuda":
        model = torch.compile(model)

    # ---- resume from the last checkpoint of this fingerprint, if a killed run left one
    ckpt_path = work / CHECKPOINT
    start_step, curve, tokens_seen = 0, [], 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        _load_state(raw_model, optimizer, state, dist)
        start_step, curve, tokens_seen = state["step"], state["curve"], state["tokens_seen"]
    else:
        curve.append({"step": 0, "tokens": 0, "lr": 0.0, "train_loss": None,
                      "val_loss": evaluate(raw_model, val, spec, micro, device, bf16)})

    # ---- the loop
    progress = Progress(label, total_steps, start_step, enabled=dist.main)
    model.train()
    trained_tokens, train_time, stopped_at = 0, 0.0, None
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, total_steps, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for m in range(accum):
            first = (step * accum + m) * micro * dist.world + dist.rank * micro
            batch = train[order.blocks(first, micro)].to(device, non_blocking=True)
            sync = dist.world == 1 or m == accum - 1  # all-reduce gradients once per step
            if dist.fsdp:
                raw_model.set_requires_gradient_sync(sync)
            no_sync = model.no_sync() if not sync and not dist.fsdp else contextlib.nullcontext()
            with _autocast(device, bf16), no_sync:
                loss = model(input_ids=batch, labels=batch).loss / accum
                loss.backward()
            loss_sum += loss.detach().float().item()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, over = _reduce_step(loss_sum, deadline.passed(), dist, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        trained_tokens += step_tokens
        tokens_seen += step_tokens

        done = step + 1
        row = {"step": done, "tokens": tokens_seen, "lr": lr, "train_loss": loss_sum, "val_loss": None}
        if done % spec.eval_every == 0 or done == total_steps:
            row["val_loss"] = evaluate(raw_model, val, spec, micro, device, bf16)
        curve.append(row)
        progress.update(done, loss_sum, trained_tokens / max(train_time, 1e-9))
        if over and done < total_steps:  # at the last step, finishing costs less than stopping
            stopped_at = done
        if stopped_at or (done % checkpoint_every == 0 and done < total_steps):
            _save_checkpoint(ckpt_path, raw_model, optimizer, done, curve, tokens_seen, dist)
        if dist.world > 1:
            torch_dist.barrier()
        if stopped_at:
            break
    progress.close()
    if stopped_at:
        stop = {"limit_s": time_limit, "step": stopped_at, "steps": total_steps}
        return LoopResult({TIME_LIMIT_KEY: stop, "resumed_from_step": start_step}, curve, stopped_at)

    tokens_per_s = trained_tokens / max(train_time, 1e-9)
    val_losses = [r["val_loss"] for r in curve if r["val_loss"] is not None]
    metrics = {
        "val_loss_initial": val_losses[0], "val_loss_final": val_losses[-1],
        "val_perplexity_final": math.exp(min(val_losses[-1], 50.0)),
        "tokens_seen": tokens_seen, "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, raw_model, seq_len, device, dist.world),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "steps": total_steps, "resumed_from_step": start_step, "batch_tokens_effective": step_tokens,
        "grad_accumulation": accum, "processes": dist.world, "device": str(device),
        "strategy": dist.strategy if dist.world > 1 else "single",
        "parameters": sum(p.numel() for p in raw_model.parameters()),
        "train_blocks": len(train), "val_blocks": len(val), "seq_len": seq_len,
    }
    return LoopResult(metrics, curve)


def save_trained(model: torch.nn.Module, tokenizer, result: LoopResult, out: Path, dist: Dist) -> bool:
    """Writes the trained model (unsharded) and its tokenizer as a Model artifact, and its loss curve.

    Call on every process (the FSDP export is collective); returns True on the one that wrote.
    A loop stopped by its time limit writes nothing: the stage fails and a rerun resumes."""
    if result.stopped_at is not None:
        return False
    trained = export_model(model, dist)
    if not dist.main:
        return False
    Model.save(out, trained, tokenizer)
    write_curve(result.curve, out / Model.CURVE)
    return True


def write_curve(curve: list[dict[str, Any]], path: Path) -> None:
    """The loss curve as CSV: step, tokens, lr, train_loss, val_loss (empty where not measured)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "tokens", "lr", "train_loss", "val_loss"])
        writer.writeheader()
        for row in curve:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def pick_device(planned: str, dist: Dist = Dist()) -> torch.device:
    """This process's GPU when the plan put the stage on CUDA (the device is in its key), else the CPU."""
    import torch

    if planned != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StageError("this stage was planned for a CUDA device (its fingerprint says so), but this machine "
                         "has none: run it on a GPU worker, or plan it here")
    return torch.device("cuda", dist.local_rank)


def loop_resolution(cfg: OptimSpec, where: Where) -> dict[str, Any]:
    """What the loop fixes where it runs, all of which changes the weights: the device, the
    precision (bf16 autocast where the device computes bf16 natively, fp32 elsewhere), the
    processes (the effective batch and the reduction order), and whether torch.compile runs
    (CUDA only)."""
    cuda = where.device == "cuda"
    return {"device": where.device, "precision": "bf16-autocast" if native_bf16(where.device) else "fp32",
            "processes": where.resources.gpus if where.resources is not None else 1,
            "compile": bool(where.runtime.compile) and cuda}
