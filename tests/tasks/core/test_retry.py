"""Retries with backoff: transient failures are retried, permanent ones are not, and a remote
store rides out a flaky connection (fsspec's in-memory filesystem stands in for S3)."""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from data_specs.errors import TransientError
from tasks.core import retry
from tasks.core.retry import is_transient_io, with_retries
from tasks.core.store import ArtifactRecord, ArtifactStore, now_iso


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the backoff delays instead of sleeping them."""
    delays: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", delays.append)
    return delays


def failing(times: int, error: Exception, result: str = "ok") -> Callable[[], str]:
    """A call that raises `error` its first `times` calls, then returns `result`."""
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return result
    call.calls = calls  # type: ignore[attr-defined]
    return call


def test_transient_errors_are_retried_with_growing_capped_backoff(no_sleep):
    call = failing(3, ConnectionResetError("reset by peer"))
    assert with_retries(call, "uploading x", attempts=5) == "ok"
    assert call.calls["n"] == 4
    assert len(no_sleep) == 3
    for attempt, delay in enumerate(no_sleep):  # full jitter: within [0, base * 2**attempt]
        assert 0 <= delay <= retry.BACKOFF_BASE_S * 2 ** attempt


def test_exhausted_retries_raise_transient_error_naming_the_operation():
    call = failing(10, TimeoutError("read timed out"))
    with pytest.raises(TransientError, match=r"uploading s3://b/x failed 3 times; last error: TimeoutError"):
        with_retries(call, "uploading s3://b/x", attempts=3)
    assert call.calls["n"] == 3


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied"),
                                   OSError(errno.ENOSPC, "No space left on device"), ValueError("bad json")])
def test_permanent_errors_are_not_retried(error, no_sleep):
    call = failing(1, error)
    with pytest.raises(type(error)):
        with_retries(call, "x")
    assert call.calls["n"] == 1 and no_sleep == []


def test_classification():
    assert is_transient_io(ConnectionError()) and is_transient_io(TimeoutError())
    assert is_transient_io(OSError(errno.EIO, "I/O error"))  # s3fs wraps a 503 as a bare OSError
    assert not is_transient_io(OSError(errno.EROFS, "read-only"))
    assert not is_transient_io(KeyError("x"))
    from botocore.exceptions import EndpointConnectionError

    assert is_transient_io(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))


def flaky(monkeypatch: pytest.MonkeyPatch, fs, method: str, failures: int) -> None:
    """Makes `fs.method` drop the connection on its first `failures` calls."""
    real = getattr(fs, method)
    left = {"n": failures}

    def wrapper(*args, **kwargs):
        if left["n"] > 0:
            left["n"] -= 1
            raise ConnectionResetError(f"{method}: connection reset by peer")
        return real(*args, **kwargs)
    monkeypatch.setattr(fs, method, wrapper)


def test_remote_store_publishes_and_reads_through_a_flaky_connection(monkeypatch, tmp_path, no_sleep):
    store = ArtifactStore(f"memory://flaky-{uuid.uuid4().hex[:8]}/store", local_cache=tmp_path / "cache")
    assert not store.is_local
    build = store.new_build_dir("s", "f1")
    (build / "payload.txt").write_text("grist")
    record = ArtifactRecord(stage="s", fingerprint="f1", run_name="r", key={}, metrics={},
                            files={"payload.txt": {"sha256": "-", "bytes": 5}}, wall_s=0.0, versions={},
                            created_at=now_iso())
    for method in ("put", "pipe_file", "cat_file", "get"):
        flaky(monkeypatch, store.fs, method, failures=2)
    store.publish(build, record)
    assert store.load("s", "f1") == record
    assert Path(store.materialize("s", "f1"), "payload.txt").read_text() == "grist"
    assert len(no_sleep) == 8  # two retries for each of the four operations


def test_remote_store_gives_up_with_a_message_naming_the_url(monkeypatch, tmp_path):
    store = ArtifactStore(f"memory://down-{uuid.uuid4().hex[:8]}/store", local_cache=tmp_path / "cache")
    build = store.new_build_dir("s", "f1")
    (build / "payload.txt").write_text("grist")
    flaky(monkeypatch, store.fs, "put", failures=100)
    record = ArtifactRecord(stage="s", fingerprint="f1", run_name="r", key={}, metrics={}, files={},
                            wall_s=0.0, versions={}, created_at=now_iso())
    with pytest.raises(TransientError, match=rf"uploading {store.url}/s/f1 failed 5 times"):
        store.publish(build, record)
    assert store.load("s", "f1") is None  # nothing half-published counts as done
