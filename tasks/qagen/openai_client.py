"""A client for any OpenAI-compatible chat endpoint: a disk cache, bounded concurrency, retries.

Every reply is cached on disk (one JSON file per request, named by a hash of what was asked,
never of the key), so a rerun, or a rerun after a crash halfway, pays only for the requests it
has not made yet. The API key is read once by `resolve_api_key` and lives only in the
Authorization header: it is never logged, written to a cache file, put in an exception
message or in a repr. The Q&A generator that uses it is tasks/qagen/openai_generator.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import httpx

from data_specs.errors import InputError
from data_specs.schema import OpenAISpec
from tasks.core.retry import backoff_delay_s

log = logging.getLogger("gristmill")

Messages = list[dict[str, str]]

# Backoff between retries: tasks/retry.py's full jitter; a Retry-After header, when the
# endpoint sends one, replaces the jitter (capped there too).
# 408 is a server-side timeout; 429 is rate limiting; 5xx are the server's own failures.
_RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
# Characters of an error body quoted in an exception (after the key is redacted from it).
_BODY_QUOTE_CHARS = 300


def resolve_api_key(spec: OpenAISpec) -> str:
    """The key: from the Prefect Secret block `spec.secret_block` when set (so a deployment can
    keep keys out of the environment), else from the environment variable `spec.api_key_env`.
    A missing key is an InputError naming where it was looked for, never showing any key."""
    if spec.secret_block:
        from prefect.blocks.system import Secret  # imported here: prefect is slow to import

        try:
            value = Secret.load(spec.secret_block).get()
        except Exception as e:  # no key is known yet, so the message cannot hold one
            raise InputError(f"qa.openai.secret_block: Prefect Secret block {spec.secret_block!r} "
                             f"could not be loaded ({type(e).__name__})") from None
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"qa.openai.secret_block: Prefect Secret block {spec.secret_block!r} "
                             "holds no key (a non-empty string)")
        return value.strip()
    if not spec.api_key_env:
        raise InputError("qa.openai: set api_key_env (an environment variable) or secret_block")
    value = os.environ.get(spec.api_key_env, "").strip()
    if not value:
        raise InputError(f"qa.openai.api_key_env: environment variable {spec.api_key_env} is not set "
                         "(it must hold the endpoint's API key)")
    return value


class ChatClient:
    """Chat completions with a disk cache, bounded concurrency and retries.

    `stats` counts what happened, for the stage's metrics: requests (HTTP calls made, retries
    included), cache_hits, retries, and unparseable (replies the parsers could not read).
    """

    def __init__(self, spec: OpenAISpec, api_key: str, cache_dir: Path, runtime: Any = None):
        """`spec` holds what shapes the replies (endpoint, model, temperature); `runtime` the
        settings that do not (concurrency, retries, timeout, where the key is), by default `spec`."""
        self.spec = spec
        self.runtime = runtime if runtime is not None else spec
        self.base_url = spec.base_url.rstrip("/")
        self.endpoint = f"{self.base_url}/chat/completions"
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._api_key = api_key
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {"requests": 0, "cache_hits": 0, "retries": 0, "unparseable": 0}

    def __repr__(self) -> str:
        # Written by hand so the key can never show up in a log line or a traceback.
        return f"ChatClient(endpoint={self.endpoint!r}, model={self.spec.model!r}, cache_dir={str(self.cache_dir)!r})"

    def count(self, name: str, n: int = 1) -> None:
        """Adds to a counter in `stats` (thread-safe: workers count retries concurrently)."""
        with self._lock:
            self.stats[name] = self.stats.get(name, 0) + n

    def complete_many(self, conversations: list[Messages]) -> list[str]:
        """The reply to each conversation, in the order given. Cached ones cost no HTTP call;
        the rest run at most `spec.concurrency` at a time, each cached as soon as it arrives so
        a failure halfway loses nothing already paid for."""
        keys = [self._cache_key(c) for c in conversations]
        replies: dict[str, str] = {}
        todo: dict[str, Messages] = {}
        for key, conversation in zip(keys, conversations):
            if key in todo:
                continue  # asked twice in one batch: one call answers both
            if key not in replies:
                cached = self._read_cache(key)
                if cached is None:
                    todo[key] = conversation
                    continue
                replies[key] = cached
            self.count("cache_hits")
        if todo:
            replies.update(self._fetch_all(todo))
        return [replies[k] for k in keys]

    def _fetch_all(self, todo: dict[str, Messages]) -> dict[str, str]:
        """Runs the uncached requests on a thread pool sharing one connection pool."""
        headers = {"Authorization": f"Bearer {self._api_key}"}
        timeout = httpx.Timeout(self.runtime.timeout_s)
        workers = min(self.runtime.concurrency, len(todo))
        replies: dict[str, str] = {}
        with httpx.Client(headers=headers, timeout=timeout) as http, ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(self._fetch, http, key, msgs): key for key, msgs in todo.items()}
            try:
                for future in as_completed(futures):
                    replies[futures[future]] = future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # requests not started yet are not made
                raise
        return replies

    def _fetch(self, http: httpx.Client, key: str, messages: Messages) -> str:
        content = self._post(http, messages)
        self._write_cache(key, messages, content)  # at once: a later failure loses nothing
        return content

    def _post(self, http: httpx.Client, messages: Messages) -> str:
        """One request with retries on 408/429/5xx, timeouts and dropped connections."""
        payload = {"model": self.spec.model, "messages": messages, "temperature": self.spec.temperature}
        problem = ""
        for attempt in range(self.runtime.max_retries + 1):
            retry_after: float | None = None
            self.count("requests")
            try:
                response = http.post(self.endpoint, json=payload)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                problem = type(e).__name__  # the type only: httpx messages are not ours to vet
            except httpx.HTTPError as e:
                raise RuntimeError(f"request to {self.endpoint} failed: {type(e).__name__}") from None
            else:
                if 200 <= response.status_code < 300:
                    return _reply_content(response, self.endpoint)
                if response.status_code not in _RETRYABLE_STATUS:
                    raise RuntimeError(self._status_message(response))
                problem = f"HTTP {response.status_code}"
                retry_after = _retry_after_s(response)
            if attempt == self.runtime.max_retries:
                break
            delay = backoff_delay_s(attempt, retry_after)
            self.count("retries")
            log.warning("%s: %s, retry %d/%d in %.2f s", self.endpoint, problem, attempt + 1,
                        self.runtime.max_retries, delay)
            time.sleep(delay)
        raise RuntimeError(f"{self.endpoint}: gave up after {self.runtime.max_retries} retries (last: {problem})")

    def _status_message(self, response: httpx.Response) -> str:
        """An error naming the status and the endpoint; the body is quoted with the key redacted,
        except for auth failures, whose bodies may echo part of the key."""
        message = f"HTTP {response.status_code} from {self.endpoint}"
        if response.status_code in (401, 403):
            source = (f"Prefect Secret block {self.runtime.secret_block!r}" if self.runtime.secret_block
                      else f"environment variable {self.runtime.api_key_env}")
            return f"{message}: the endpoint refused the API key (from {source})"
        body = response.text[:_BODY_QUOTE_CHARS]
        if self._api_key:
            body = body.replace(self._api_key, "***")
        return f"{message}: {body}" if body else message

    # ------------------------------------------------------------ cache

    def _cache_key(self, messages: Messages) -> str:
        """sha256 of what was asked (endpoint, model, messages, temperature), never of the key:
        the same question to the same model is one cache entry whoever pays for it."""
        canonical = json.dumps(self._request_view(messages), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _request_view(self, messages: Messages) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.spec.model, "messages": messages,
                "temperature": self.spec.temperature}

    def _read_cache(self, key: str) -> str | None:
        path = self.cache_dir / f"{key}.json"
        try:
            content = json.loads(path.read_text(encoding="utf-8"))["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or torn by an old crash: ask again
        return content if isinstance(content, str) else None

    def _write_cache(self, key: str, messages: Messages, content: str) -> None:
        """Written to a temp file and renamed, so a reader never sees half a file."""
        record = {"request": self._request_view(messages), "content": content}
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, self.cache_dir / f"{key}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _retry_after_s(response: httpx.Response) -> float | None:
    """Retry-After in seconds; an HTTP-date or garbage falls back to the jittered backoff."""
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _reply_content(response: httpx.Response, endpoint: str) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RuntimeError(f"{endpoint}: HTTP {response.status_code} reply is not a chat completion") from None
    return content if isinstance(content, str) else ""  # null content (a refusal): unparseable later


# ---------------------------------------------------------------- parsing
