"""What a benchmark ran on, printed beside its ratios: cores, CPU model, load average, and the
torch thread settings (bench scripts import it as `from machine import describe`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    threads = ""
    try:
        import torch

        threads = f", torch threads={torch.get_num_threads()}/{torch.get_num_interop_threads()} (intra/inter-op)"
    except ImportError:
        pass
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
                   if k in os.environ)
    return (f"machine: nproc={len(os.sched_getaffinity(0))}, cpu={model}, load average={load}{threads}"
            + (f", {env}" if env else ""))
