"""Progress: a bar on a terminal, a log line every 10% elsewhere, a Prefect artifact in a task run."""

from __future__ import annotations

import logging
import subprocess
import sys

from tasks.core.progress import Progress
from tests.conftest import REPO


def test_outside_a_terminal_it_logs_every_ten_percent(gristmill_log):
    progress = Progress("embed", 40, unit="chunk")
    for done in range(1, 41):
        progress.update(done)
    progress.close()
    # (each record is seen twice: the fixture's handler on the logger, and caplog's through the root)
    lines = list(dict.fromkeys(r.getMessage() for r in gristmill_log.records if r.levelno == logging.INFO))
    assert len(lines) == 10 and lines[0].startswith("embed: chunk 4/40 (10%)") and "40/40 (100%)" in lines[-1]


def test_a_process_without_prefect_does_not_import_it_for_progress():
    """Only a Prefect task run gets a progress artifact, and a process that never imported Prefect is
    in none: a torchrun process or a run without Prefect does not pay ~2.5 s to find that out."""
    code = ("import sys\nfrom tasks.core.progress import Progress\np = Progress('x', 4)\np.update(4)\np.close()\n"
            "print('prefect' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
