"""The `openai` Q&A generator: any OpenAI-compatible chat endpoint writes the pairs.

Used by the qa stage through `resolve_api_key`, `ChatClient`, `generate_pairs` and
`paraphrase_questions`. Every reply is cached on disk (one JSON file per request, named by a
hash of what was asked, never of the key), so a rerun, or a rerun after a crash halfway,
pays only for the requests it has not made yet.

The API key is read once by `resolve_api_key` and lives only in the Authorization header:
it is never logged, written to a cache file, put in an exception message or in a repr.

Alone:   gristmill run SPEC --only qa   (with `qa.generator: openai`)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import httpx

from data_specs.spec import OpenAISpec
from tasks.errors import InputError
from tasks.qa_common import Pair, locate, normalize_question
from tasks.retry import backoff_delay_s

log = logging.getLogger("gristmill")

Messages = list[dict[str, str]]

# Backoff between retries: tasks/retry.py's full jitter; a Retry-After header, when the
# endpoint sends one, replaces the jitter (capped there too).
# 408 is a server-side timeout; 429 is rate limiting; 5xx are the server's own failures.
_RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
# Conversations sent to `complete_many` at once by `generate_pairs`: enough to keep every
# worker busy, few enough that a large corpus is never held in memory whole.
BATCH_CONVERSATIONS = 256
# Characters of an error body quoted in an exception (after the key is redacted from it).
_BODY_QUOTE_CHARS = 300

PAIRS_SYSTEM = ("You write question-answer pairs for reading-comprehension training data. "
                "You reply with JSON only.")
PAIRS_PROMPT = (
    "Write up to {n} question-answer pairs about the passage below. Each answer must be a short "
    "span copied VERBATIM (character for character) from the passage. Each question must make sense "
    "on its own, without the passage: name the subject instead of saying 'the passage'. "
    'Reply with a JSON list only: [{{"question": "...", "answer": "..."}}]\n\n'
    "<passage>\n{passage}\n</passage>"
)
PARAPHRASE_PROMPT = (
    "Write {k} rewordings of the question below: the same meaning and the same answer, in "
    "different words. Reply with a JSON list of {k} strings only.\n\n"
    "<question>\n{question}\n</question>"
)


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

    def __init__(self, spec: OpenAISpec, api_key: str, cache_dir: Path):
        self.spec = spec
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
        timeout = httpx.Timeout(self.spec.timeout_s)
        workers = min(self.spec.concurrency, len(todo))
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
        for attempt in range(self.spec.max_retries + 1):
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
            if attempt == self.spec.max_retries:
                break
            delay = backoff_delay_s(attempt, retry_after)
            self.count("retries")
            log.warning("%s: %s, retry %d/%d in %.2f s", self.endpoint, problem, attempt + 1,
                        self.spec.max_retries, delay)
            time.sleep(delay)
        raise RuntimeError(f"{self.endpoint}: gave up after {self.spec.max_retries} retries (last: {problem})")

    def _status_message(self, response: httpx.Response) -> str:
        """An error naming the status and the endpoint; the body is quoted with the key redacted,
        except for auth failures, whose bodies may echo part of the key."""
        message = f"HTTP {response.status_code} from {self.endpoint}"
        if response.status_code in (401, 403):
            source = (f"Prefect Secret block {self.spec.secret_block!r}" if self.spec.secret_block
                      else f"environment variable {self.spec.api_key_env}")
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


_FENCED = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.S)


def parse_json_list(reply: str) -> list[Any] | None:
    """The JSON list in a model's reply, or None. Tolerates ``` fences, prose around the list,
    and an object wrapping exactly one list (e.g. {"pairs": [...]}), which models often add."""
    fenced = _FENCED.search(reply)
    text = (fenced.group(1) if fenced else reply).strip()
    try:
        value = json.loads(text)
    except ValueError:
        start, end = text.find("["), text.rfind("]")
        if start < 0 or end <= start:
            return None
        try:
            value = json.loads(text[start:end + 1])
        except ValueError:
            return None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else None
    return value if isinstance(value, list) else None


def _qa_items(items: list[Any]) -> list[tuple[str, str]]:
    """(question, answer) of the well-formed items; others are skipped."""
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        q, a = item.get("question"), item.get("answer")
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            out.append((q.strip(), a.strip()))
    return out


# ---------------------------------------------------------------- chunks and pairs


_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def split_chunks(text: str, chunk_chars: int) -> list[str]:
    """Pieces of `text` of at most `chunk_chars` characters, cut between paragraphs when one
    fits, else at a space, else anywhere. Every chunk is a slice of `text`, so an answer copied
    verbatim from a chunk is verbatim in the document too."""
    bounds, pos = [], 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        bounds.append((pos, m.start()))
        pos = m.end()
    bounds.append((pos, len(text)))
    pieces = [p for a, b in bounds for p in _cut(text, a, b, chunk_chars) if text[p[0]:p[1]].strip()]
    chunks: list[str] = []
    start = end = -1
    for a, b in pieces:
        if start >= 0 and b - start <= chunk_chars:
            end = b  # the next paragraph still fits: same chunk
            continue
        if start >= 0:
            chunks.append(text[start:end].strip())
        start, end = a, b
    if start >= 0:
        chunks.append(text[start:end].strip())
    return chunks


def _cut(text: str, start: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
    """Splits text[start:end] into spans of at most `limit` characters, at whitespace."""
    while end - start > limit:
        window = text[start:start + limit + 1]
        cut = max(window.rfind(" "), window.rfind("\n"))
        cut = start + cut if cut > limit // 2 else start + limit  # no space late enough: hard cut
        yield start, cut
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if end > start:
        yield start, end


def _quotas(n_chunks: int, per_doc: int) -> list[int]:
    """Pairs asked of each chunk: `per_doc` spread evenly over the chunks; with fewer pairs
    than chunks, one pair each from evenly spaced chunks (the rest are not sent at all)."""
    if per_doc >= n_chunks:
        return [per_doc // n_chunks + (i < per_doc % n_chunks) for i in range(n_chunks)]
    quotas = [0] * n_chunks
    for i in range(per_doc):
        quotas[i * n_chunks // per_doc] = 1
    return quotas


def pairs_conversation(passage: str, n: int) -> Messages:
    """The request for up to `n` pairs about one passage."""
    return [{"role": "system", "content": PAIRS_SYSTEM},
            {"role": "user", "content": PAIRS_PROMPT.format(n=n, passage=passage)}]


def generate_pairs(docs: Iterable[dict[str, Any]], client: ChatClient, per_doc: int,
                   chunk_chars: int) -> Iterator[Pair]:
    """Up to `per_doc` pairs per document {"id", "text"}, with the answer's span in the text
    (None when the model did not copy it verbatim). Documents are read in batches of about
    BATCH_CONVERSATIONS chunks so the endpoint sees `concurrency` requests in flight."""
    batch: list[tuple[dict[str, Any], list[tuple[str, int]]]] = []
    size = 0
    for doc in docs:
        chunks = split_chunks(doc["text"], chunk_chars)
        asks = [(c, q) for c, q in zip(chunks, _quotas(len(chunks), per_doc)) if q] if chunks else []
        batch.append((doc, asks))
        size += len(asks)
        if size >= BATCH_CONVERSATIONS:
            yield from _pairs_of_batch(batch, client)
            batch, size = [], 0
    if batch:
        yield from _pairs_of_batch(batch, client)


def _pairs_of_batch(batch: list[tuple[dict[str, Any], list[tuple[str, int]]]],
                    client: ChatClient) -> Iterator[Pair]:
    conversations = [pairs_conversation(chunk, n) for _, asks in batch for chunk, n in asks]
    replies = iter(client.complete_many(conversations))
    for doc, asks in batch:
        text, doc_id = doc["text"], str(doc["id"])
        for _, n in asks:
            items = parse_json_list(next(replies))
            if items is None:
                client.count("unparseable")
                continue
            for question, answer in _qa_items(items)[:n]:
                yield Pair(question=question, answer=answer, doc_id=doc_id,
                           span=locate(answer, text), generator="openai")


# ---------------------------------------------------------------- paraphrases


def paraphrase_conversation(question: str, k: int) -> Messages:
    """The request for `k` rewordings of one question."""
    return [{"role": "user", "content": PARAPHRASE_PROMPT.format(k=k, question=question)}]


def paraphrase_questions(questions: list[str], client: ChatClient, k: int) -> list[list[str]]:
    """Up to `k` rewordings per question, in order: fewer when the reply has fewer (or repeats
    the question), [] when the reply cannot be read (counted in stats["unparseable"])."""
    if k <= 0 or not questions:
        return [[] for _ in questions]
    replies = client.complete_many([paraphrase_conversation(q, k) for q in questions])
    out: list[list[str]] = []
    for question, reply in zip(questions, replies):
        items = parse_json_list(reply)
        if items is None:
            client.count("unparseable")
        seen, kept = {normalize_question(question)}, []
        for item in items or []:
            norm = normalize_question(item) if isinstance(item, str) else ""
            if norm and norm not in seen:
                seen.add(norm)
                kept.append(item.strip())
        out.append(kept[:k])
    return out
