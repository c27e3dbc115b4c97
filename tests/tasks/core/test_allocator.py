"""The allocator keeps freed memory: a training step's big buffers are not faulted in again."""

import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

STEPS = """
import ctypes, resource, sys
# PR_SET_THP_DISABLE: 4 KiB pages whatever the machine's transparent huge pages can give. With
# them a 64 MiB buffer is 32 faults when the kernel finds free 2 MiB blocks and 16,384 when it
# does not, so the default's count swung from ~10,900 to 661 between two runs on one machine.
assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0
import numpy as np
if sys.argv[1] == "tuned":
    from tasks.core.allocator import keep_freed_memory
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a 64 MiB buffer per step, like the demo's logits
    buffer = np.empty(16 * 2**20, dtype=np.float32)
    buffer.fill(1.0)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    """Page faults over 20 steps of 4 KiB pages: by default every step maps and zeroes fresh pages
    (327,700 faults, three runs alike); tuned, the first step's pages serve the rest (16,335)."""
    default, tuned = _page_faults("default"), _page_faults("tuned")
    assert tuned * 10 < default, (default, tuned)
