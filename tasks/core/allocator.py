"""The C allocator, tuned for training and embedding on CPU.

glibc serves every allocation over 32 MiB (a batch's logits: 8 sequences x 256 tokens x 8,192
words x 4 bytes = 64 MiB) with a fresh mmap and hands it back on free, so each training step
faults in and zeroes the same pages again: a quarter of the CPU time of pretraining on 2 cores
went to the kernel (bench/pretrain.py prints it). Raising the mmap and trim thresholds keeps
freed memory in the heap for the next step: 6.9k -> 9.1k tokens/s on the demo's model, kernel
time ~20% -> ~0%. The cost is that a process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache

log = logging.getLogger("gristmill")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap, and freed memory stays there


@cache
def keep_freed_memory() -> bool:
    """Once per process: raise glibc's mmap and trim thresholds. False where there is no glibc
    (macOS, musl): nothing changes there."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the thresholds: the allocator keeps its defaults")
    return done
