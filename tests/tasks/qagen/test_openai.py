"""The openai Q&A generator and its client: real HTTP to a small OpenAI-compatible server run in the test (no mocked httpx)."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from data_specs.errors import InputError
from data_specs.schema import OpenAISpec
from tasks.core import retry
from tasks.qagen.common import split_chunks
from tasks.qagen.openai_client import ChatClient, resolve_api_key
from tasks.qagen.openai_generator import generate_pairs, paraphrase_questions, parse_json_list

KEY = "sk-test-9f8e7d6c5b4a-do-not-leak"
KEY_ENV = "GRISTMILL_TEST_OPENAI_KEY"
PASSAGE = re.compile(r"<passage>\n(.*)\n</passage>", re.S)
QUESTION = re.compile(r"Write (\d+) rewordings.*<question>\n(.*)\n</question>", re.S)


class FakeOpenAI:
    """What the server knows: the key it accepts, scripted failures, and what it was asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0  # time each request takes, so concurrency can be observed
        self.fail: dict[str, list[int]] = {}  # passage substring -> statuses to answer with first
        self.seen: defaultdict[str, int] = defaultdict(int)

    def reply(self, content: str) -> tuple[int, str]:
        """(status, reply text) for one user message."""
        if m := QUESTION.search(content):
            k, question = int(m.group(1)), m.group(2)
            return 200, json.dumps([f"In other words ({i}), {question}" for i in range(k)])
        passage = PASSAGE.search(content).group(1)
        with self.lock:
            for marker, statuses in self.fail.items():
                if marker in passage and statuses:
                    return statuses.pop(0), ""
        if "GARBLE" in passage:
            return 200, "not json"
        first = (re.match(r"[^.]*\.", passage) or re.match(r"\s*[^\n]+", passage)).group(0)  # a sentence, else a line
        topic = " ".join(passage.split()[:6])
        pairs = [{"question": f"What does the passage starting '{topic}' say first?", "answer": first},
                 {"question": "What is invented?", "answer": "words that are not in the passage"}]
        return 200, "```json\n" + json.dumps(pairs) + "\n```"  # fenced, as chat models often do


def make_handler(state: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep the test output quiet
            pass

        def send(self, status: int, body: dict[str, Any] | None) -> None:
            data = json.dumps(body or {"error": {"message": "scripted failure"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.calls += 1
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                threading.Event().wait(state.delay_s)
                if self.path != "/v1/chat/completions":
                    return self.send(404, None)
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self.send(401, {"error": {"message": "Incorrect API key provided"}})
                assert set(body) == {"model", "messages", "temperature"}
                status, content = state.reply(body["messages"][-1]["content"])
                if status != 200:
                    return self.send(status, None)
                self.send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})
            finally:
                with state.lock:
                    state.in_flight -= 1

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[FakeOpenAI, str]]:
    """A live endpoint on a free port; yields its state and base_url."""
    state = FakeOpenAI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without Retry-After (timeouts, dropped connections) wait milliseconds, not seconds."""
    monkeypatch.setattr(retry, "BACKOFF_BASE_S", 0.01)


def make_spec(base_url: str, **kw: Any) -> OpenAISpec:
    fields = {"base_url": base_url, "model": "fake-model", "api_key_env": KEY_ENV, "max_retries": 3,
              "concurrency": 4, "timeout_s": 5.0, "chunk_chars": 200}
    return OpenAISpec(**{**fields, **kw})


def sentence(i: int) -> str:
    return f"Fact number {i} is that the mill grinds grain number {i} into flour."


def docs(n: int = 3, paragraphs: int = 2) -> list[dict[str, str]]:
    """Documents of short paragraphs; with chunk_chars=200 each paragraph is one chunk."""
    out = []
    for d in range(n):
        paras = [" ".join(sentence(100 * d + 10 * p + s) for s in range(2)) for p in range(paragraphs)]
        out.append({"id": f"doc{d}", "text": "\n\n".join(paras)})
    return out


def n_chunks(documents: list[dict[str, str]], chunk_chars: int = 200) -> int:
    return sum(len(split_chunks(d["text"], chunk_chars)) for d in documents)


# ---------------------------------------------------------------- pairs, cache, retries


def test_pairs_have_verbatim_spans_and_a_rerun_is_free(server, tmp_path, monkeypatch):
    state, url = server
    monkeypatch.setenv(KEY_ENV, KEY)
    spec, documents = make_spec(url), docs()
    chunks = n_chunks(documents)
    assert chunks == 6

    client = ChatClient(spec, resolve_api_key(spec), tmp_path / "cache")
    pairs = list(generate_pairs(documents, client, per_doc=4, chunk_chars=spec.chunk_chars))
    assert client.stats["requests"] == chunks == state.calls
    assert client.stats["cache_hits"] == 0 and client.stats["unparseable"] == 0
    assert len(pairs) == 2 * chunks  # per_doc=4 over 2 chunks: 2 asked of each, 2 returned
    texts = {d["id"]: d["text"] for d in documents}
    located = [p for p in pairs if p.span is not None]
    assert len(located) == chunks  # the invented answer is never located
    for p in pairs:
        assert p.generator == "openai" and p.doc_id in texts
        if p.span is not None:
            assert texts[p.doc_id][p.span[0]:p.span[1]] == p.answer
        else:
            assert p.answer not in texts[p.doc_id]

    again = ChatClient(spec, KEY, tmp_path / "cache")
    assert list(generate_pairs(documents, again, per_doc=4, chunk_chars=spec.chunk_chars)) == pairs
    assert again.stats["requests"] == 0 and again.stats["cache_hits"] == chunks
    assert state.calls == chunks


def test_cache_key_ignores_the_api_key_but_not_the_model(server, tmp_path, monkeypatch):
    state, url = server
    documents = docs(1)
    list(generate_pairs(documents, ChatClient(make_spec(url), KEY, tmp_path), 4, 200))
    other_key = ChatClient(make_spec(url), "sk-another-key", tmp_path)
    list(generate_pairs(documents, other_key, 4, 200))
    assert other_key.stats["requests"] == 0  # a cache hit: the key is not part of what was asked
    other_model = ChatClient(make_spec(url, model="other-model"), KEY, tmp_path)
    list(generate_pairs(documents, other_model, 4, 200))
    assert other_model.stats["requests"] == 2 and other_model.stats["cache_hits"] == 0


def test_retries_429_then_500_then_succeeds(server, tmp_path):
    state, url = server
    documents = docs(1, paragraphs=1)
    state.fail[documents[0]["text"][:40]] = [429, 500]
    client = ChatClient(make_spec(url), KEY, tmp_path)
    pairs = list(generate_pairs(documents, client, per_doc=2, chunk_chars=200))
    assert client.stats["retries"] >= 2 and client.stats["requests"] == 3 == state.calls
    assert [p.span is not None for p in pairs] == [True, False]


def test_gives_up_after_max_retries(server, tmp_path):
    state, url = server
    documents = docs(1, paragraphs=1)
    state.fail[documents[0]["text"][:40]] = [503] * 10
    client = ChatClient(make_spec(url, max_retries=2), KEY, tmp_path)
    with pytest.raises(RuntimeError, match=r"gave up after 2 retries.*HTTP 503"):
        list(generate_pairs(documents, client, per_doc=2, chunk_chars=200))
    assert client.stats["requests"] == 3 and client.stats["retries"] == 2
    assert not list(tmp_path.glob("*.json"))  # a failure is never cached


def test_connection_errors_are_retried_then_reported(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(make_spec(f"http://127.0.0.1:{port}/v1", max_retries=1), KEY, tmp_path)
    with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions.*ConnectError"):
        client.complete_many([[{"role": "user", "content": "hi"}]])
    assert client.stats["retries"] == 1


def test_concurrency_is_used_and_bounded(server, tmp_path):
    state, url = server
    state.delay_s = 0.1
    documents = docs(8, paragraphs=1)
    client = ChatClient(make_spec(url, concurrency=3), KEY, tmp_path)
    list(generate_pairs(documents, client, per_doc=1, chunk_chars=200))
    assert state.calls == 8
    assert 2 <= state.max_in_flight <= 3


def test_wrong_key_is_a_runtime_error_without_the_key(server, tmp_path):
    state, url = server
    wrong = "sk-wrong-key-1234567890"
    client = ChatClient(make_spec(url), wrong, tmp_path)
    with pytest.raises(RuntimeError) as info:
        list(generate_pairs(docs(1), client, 2, 200))
    message = str(info.value)
    assert "401" in message and f"{url}/chat/completions" in message and KEY_ENV in message
    assert wrong not in message and wrong not in repr(info.value) and wrong not in repr(client)
    assert client.stats["retries"] == 0  # a 401 is not retried


def test_unparseable_reply_is_counted_and_yields_nothing(server, tmp_path):
    state, url = server
    documents = docs(2, paragraphs=1)
    documents[1]["text"] = "GARBLE this passage. The server answers it with prose."
    client = ChatClient(make_spec(url), KEY, tmp_path)
    pairs = list(generate_pairs(documents, client, 2, 200))
    assert client.stats["unparseable"] == 1
    assert {p.doc_id for p in pairs} == {"doc0"}


def test_paraphrases(server, tmp_path):
    state, url = server
    client = ChatClient(make_spec(url), KEY, tmp_path)
    questions = ["What does the mill grind?", "Who owns the mill?"]
    out = paraphrase_questions(questions, client, k=3)
    assert [len(p) for p in out] == [3, 3]
    assert all(q in p for q, ps in zip(questions, out) for p in ps)
    assert paraphrase_questions(questions, client, k=3) == out and client.stats["cache_hits"] == 2


def test_parse_json_list_is_robust():
    assert parse_json_list('```json\n[{"question": "q", "answer": "a"}]\n```') == [{"question": "q", "answer": "a"}]
    assert parse_json_list('Here you go: ["a", "b"] Hope it helps.') == ["a", "b"]
    assert parse_json_list('{"pairs": [1, 2]}') == [1, 2]
    for bad in ("not json", "", '{"a": 1}', "[unclosed", "```\nnope\n```"):
        assert parse_json_list(bad) is None


def test_split_chunks_prefers_paragraphs_and_stays_within_bounds():
    paras = ["a" * 90 + ".", "b" * 90 + ".", "c " * 150]
    text = "\n\n".join(paras)
    chunks = split_chunks(text, 200)
    assert chunks[0] == paras[0] + "\n\n" + paras[1]  # two paragraphs fit one chunk
    assert all(len(c) <= 200 and c in text for c in chunks)
    assert "".join(chunks).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert split_chunks("x" * 450, 200) == ["x" * 200, "x" * 200, "x" * 50]  # no space: hard cut
    assert split_chunks("  \n\n ", 200) == []


# ---------------------------------------------------------------- the key


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(InputError, match=KEY_ENV):
        resolve_api_key(make_spec("http://127.0.0.1:1/v1"))


def test_key_from_a_prefect_secret_block(monkeypatch):
    from prefect.blocks import system

    class FakeSecret:
        def get(self) -> str:
            return KEY

    def load(name: str) -> FakeSecret:
        if name != "team-openai":
            raise ValueError(f"Unable to find block document named {name}")
        return FakeSecret()

    monkeypatch.setattr(system.Secret, "load", staticmethod(load))
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert resolve_api_key(make_spec("http://x/v1", secret_block="team-openai")) == KEY
    with pytest.raises(InputError, match="no-such-block"):
        resolve_api_key(make_spec("http://x/v1", secret_block="no-such-block"))


def test_the_key_leaks_nowhere(server, tmp_path, monkeypatch, caplog, capsys):
    state, url = server
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests at INFO/DEBUG
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    documents = docs(2)
    documents[0]["text"] += "\n\nGARBLE here."
    state.fail[documents[1]["text"][:40]] = [429, 500]
    spec = make_spec(url)
    client = ChatClient(spec, resolve_api_key(spec), tmp_path / "cache")
    pairs = list(generate_pairs(documents, client, 4, spec.chunk_chars))
    paraphrase_questions([p.question for p in pairs[:2]], client, 2)
    print(client, client.stats)
    logging.getLogger("gristmill").info("%r", client)
    assert pairs and client.stats["retries"] >= 2 and client.stats["unparseable"] == 1

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.name == "cache" for p in written)
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert KEY not in captured.out and KEY not in captured.err
    assert caplog.records and KEY not in caplog.text
    assert all(KEY not in str(r.args) for r in caplog.records)


def test_qa_stage_with_the_openai_generator(server, tmp_path, monkeypatch):
    """The whole qa stage on tiny's documents: pairs, paraphrases, a free rerun, and the key in
    no file of the store (artifacts, caches, work folders)."""
    from tasks.core.runner import execute, plan
    from tests.tasks.test_pretrain import tiny_project

    state, base_url = server
    monkeypatch.setenv(KEY_ENV, KEY)
    qa = {"generator": "openai", "per_doc": 2, "paraphrases": 1,
          "openai": {"base_url": base_url, "model": "fake", "api_key_env": KEY_ENV, "chunk_chars": 400}}
    factory = tiny_project(tmp_path / "p", qa=qa)
    spec = factory.load(**factory.sections)
    results = {}
    for row in plan(spec, factory.store):
        if row.name in ("ingest", "dedup", "qa"):
            results[row.name] = execute(row, spec, factory.store)
    m = results["qa"].record.metrics
    assert m["by_generator"] == {"openai": m["pairs_kept"]} and m["pairs_kept"] > 0
    assert m["paraphrases"] > 0 and m["openai_requests"] > 0
    assert m["rejected_by_reason"]["answer_not_in_document"] > 0  # the server's invented answers

    # A changed spec (another seed) re-runs qa; every request is answered from the cache.
    spec2 = factory.load(**{**factory.sections, "qa": {**qa, "seed": 5}})
    row = [r for r in plan(spec2, factory.store) if r.name == "qa"][0]
    m2 = execute(row, spec2, factory.store).record.metrics
    assert m2["openai_requests"] == 0 and m2["openai_cache_hits"] > 0

    for path in (tmp_path / "p").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
