"""Progress of long work: a terminal bar and, inside a Prefect task run, a progress artifact."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("gristmill")


class Progress:
    """Steps done (optimizer steps, questions answered...), loss and tokens/s when there are any,
    and the ETA, on stderr and in the Prefect UI (when there is a run)."""

    def __init__(self, label: str, total: int, initial: int = 0, enabled: bool = True, unit: str = "step"):
        self.label, self.total, self.enabled, self.unit = label, total, enabled, unit
        # A live bar on a terminal; in a log file (nightly runs), a line every 10% instead.
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit, file=sys.stderr,
                        disable=not (enabled and self.tty), dynamic_ncols=True, mininterval=1.0)
        self._artifact = _prefect_progress(label, 100 * initial / max(total, 1)) if enabled else None
        self._last_pct = self._last_logged = int(100 * initial / max(total, 1))
        self._start, self._initial = time.monotonic(), initial

    def update(self, done: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        """Records that `done` steps are finished."""
        if not self.enabled:
            return
        self.bar.n = done
        postfix = {**({"loss": f"{loss:.3f}"} if loss is not None else {}),
                   **({"tok_s": f"{tokens_per_s:,.0f}"} if tokens_per_s is not None else {})}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()
        pct = int(100 * done / max(self.total, 1))
        if not self.tty and (pct >= self._last_logged + 10 or done == self.total):
            self._last_logged = pct
            rate = (done - self._initial) / max(time.monotonic() - self._start, 1e-9)
            eta = (self.total - done) / max(rate, 1e-9)
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            log.info("%s: %s %d/%d (%d%%)%s, ETA %.0f s", self.label, self.unit, done, self.total, pct, extra, eta)
        if self._artifact is not None and pct >= self._last_pct + 5:  # a few API calls, not one per step
            self._last_pct = pct
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=float(pct))

    def close(self) -> None:
        self.bar.close()


def _prefect_progress(label: str, start: float):
    """A Prefect progress artifact when this runs inside a task run; None otherwise. A process that
    has not imported Prefect is in no task run: it is not imported for the question (~2.5 s of CPU
    in each torchrun process, killable.py's runs, and any use of tasks.core.runner without Prefect)."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return None
        return create_progress_artifact(progress=start, description=f"gristmill {label}")
    except Exception as e:  # progress is a courtesy: never fail training because the API is away
        log.warning("no Prefect progress artifact: %s", e)
        return None
