"""Retrying calls that fail transiently (a remote store's I/O, an HTTP API), with backoff.

One policy for every caller: exponential backoff with full jitter, so many workers that failed
together do not retry in step (the "full jitter" scheme of the AWS architecture blog).
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from data_specs.errors import TransientError

log = logging.getLogger("gristmill")

T = TypeVar("T")

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
# Attempts at one remote-store call before the stage fails with TransientError (which Prefect
# then retries as a whole): 0.5 + 1 + 2 + 4 s of expected-worst waiting between five tries.
STORE_ATTEMPTS = 5

# OSErrors that retrying cannot fix: the thing is missing, forbidden, or the local disk is full.
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS,
                               errno.EDQUOT, errno.EFBIG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST})


def backoff_delay_s(attempt: int, retry_after_s: float | None = None) -> float:
    """Seconds to wait before retry `attempt + 1`: the server's Retry-After when given, else
    full jitter (uniform in [0, base * 2**attempt]); both capped."""
    if retry_after_s is not None:
        return min(BACKOFF_CAP_S, retry_after_s)
    return random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** attempt))


def is_transient_io(error: BaseException) -> bool:
    """Network and server trouble (worth another try), not a missing file or a full disk."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError):
        return error.errno not in _PERMANENT_ERRNOS
    # The AWS client stack's own connection errors are not OSErrors.
    return type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp") and any(
        word in type(error).__name__ for word in ("Connection", "Timeout", "ClientPayload", "ServerDisconnected"))


def with_retries(call: Callable[[], T], what: str, attempts: int = STORE_ATTEMPTS,
                 transient: Callable[[BaseException], bool] = is_transient_io) -> T:
    """`call()`, retried with backoff while it fails transiently; TransientError naming `what`
    once the attempts are spent. Other errors pass through at once."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as e:
            if not transient(e):
                raise
            if attempt == attempts - 1:
                raise TransientError(f"{what} failed {attempts} times; last error: {type(e).__name__}: {e}") from e
            delay = backoff_delay_s(attempt)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(e).__name__, e,
                        attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
