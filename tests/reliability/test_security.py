"""Security: weights load from safetensors only, a model folder's own code runs only with
`--trust-remote-code`, a spec cannot make a stage write outside its store, and an API key
never reaches a log, an artifact, a report or a Prefect parameter.

The slow tests run the CLI: as a subprocess (Prefect in ephemeral mode) with a Prefect home,
TMPDIR and Hugging Face cache of its own, so every file a run writes can be looked at; or by
its entry point in this process where only the exit code and message matter.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from data_specs.errors import InputError
from data_specs.loader import load_spec
from tests.conftest import REPO, doc_text
from tests.tasks.qagen.test_openai import KEY, KEY_ENV, server  # noqa: F401  (a fixture: the fake OpenAI endpoint)

PACKAGES = ("tasks", "eval", "flows", "data_specs")  # the code a run executes (bench/ and tests/ are not)
TINY_DOCS = REPO / "data_specs" / "tiny" / "docs.jsonl"
FAST = {"tokenizer": {"vocab_size": 512},
        "pretrain": {"model": {"preset": "tiny"}, "tokens": 20_000, "batch_tokens": 2048, "micro_batch": 16,
                     "eval_every": 5, "checkpoint_every": 5}}


# ---------------------------------------------------------------- the source tree, read as code


def calls(package: str) -> list[tuple[Path, ast.Call]]:
    """Every call expression in a package's modules."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [(path, node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return found


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_source_loads_weights_from_safetensors_only_and_never_hardcodes_remote_code() -> None:
    """torch.load only with weights_only=True; model from_pretrained only with use_safetensors=True;
    trust_remote_code always passed (left out, transformers prompts on stdin) and never a literal True;
    and every Hugging Face load is in tasks/loading.py, so the two rules hold in one place."""
    problems, seen = [], {"torch.load": 0, "from_pretrained": 0, "SentenceTransformer": 0}
    for package in PACKAGES:
        for path, call in calls(package):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            func = ast.unparse(call.func)
            if is_true(keyword(call, "trust_remote_code")):
                problems.append(f"{where}: trust_remote_code=True")
            if func == "torch.load":
                seen["torch.load"] += 1
                if not is_true(keyword(call, "weights_only")):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif func.endswith((".from_pretrained", "SentenceTransformer")):
                kind = "SentenceTransformer" if func.endswith("SentenceTransformer") else "from_pretrained"
                seen[kind] += 1
                if path.name != "loading.py":
                    problems.append(f"{where}: {func} outside tasks/loading.py")
                if keyword(call, "trust_remote_code") is None:
                    problems.append(f"{where}: {func} without an explicit trust_remote_code")
                weights = func.split(".")[0]
                model_kwargs = keyword(call, "model_kwargs")
                safetensors = is_true(keyword(call, "use_safetensors")) or (
                    isinstance(model_kwargs, ast.Dict) and any(
                        isinstance(k, ast.Constant) and k.value == "use_safetensors" and is_true(v)
                        for k, v in zip(model_kwargs.keys, model_kwargs.values)))
                if "Tokenizer" not in weights and "Config" not in weights and not safetensors:
                    problems.append(f"{where}: {func} without use_safetensors=True")
    assert not problems, "\n".join(problems)
    assert seen["torch.load"] >= 1 and seen["from_pretrained"] >= 2 and seen["SentenceTransformer"] >= 1, seen


LOADERS = {"load_causal_lm", "load_tokenizer", "load_sentence_transformer", "load_model", "load_checkpoint",
           "load_tokenizer_folder", "load_generator", "load_embedder", "load_index"}


def test_every_loader_call_passes_the_runs_remote_code_setting() -> None:
    """Each call of a loading function hands on `trust_remote_code` (from the spec or its caller),
    so `--trust-remote-code` reaches every loader and nothing defaults it silently."""
    problems, seen = [], 0
    for package in PACKAGES:
        for path, call in calls(package):
            name = ast.unparse(call.func).split(".")[-1]
            if name not in LOADERS:
                continue
            seen += 1
            args = [ast.unparse(a) for a in [*call.args, *(k.value for k in call.keywords)]]
            if not any("trust_remote_code" in a for a in args):
                problems.append(f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)[:100]}")
    assert not problems, "\n".join(problems)
    assert seen >= 12, seen


# ---------------------------------------------------------------- folders that must not load


class Unpickled:
    """A pickle that, when loaded, writes a file: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "this pickle was loaded"))


def tiny_llama(folder: Path, vocab: int = 1024) -> Path:
    """A real (tiny) Llama checkpoint in safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def pickle_only_folder(root: Path, marker: Path) -> Path:
    """config.json and a pytorch_model.bin whose loading would write `marker`; no safetensors."""
    folder = tiny_llama(root / "pickled")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Unpickled(marker)))
    return folder


def test_the_hostile_pickle_is_real(tmp_path: Path) -> None:
    """The control: loading the folder's pytorch_model.bin with pickle does run its code."""
    marker = tmp_path / "unpickled"
    folder = pickle_only_folder(tmp_path, marker)
    pickle.loads((folder / "pytorch_model.bin").read_bytes())
    assert marker.read_text() == "this pickle was loaded"


def test_pickle_only_folders_are_refused_by_every_in_process_loader(tmp_path: Path) -> None:
    from tasks.core.artifacts import Model
    from tasks.pretrain import load_checkpoint
    from tasks.qagen.model import load_generator
    from tasks.train.loading import load_embedder

    marker = tmp_path / "unpickled"
    folder = pickle_only_folder(tmp_path, marker)
    upstream = Model(folder.parent, None)  # an upstream model artifact (sft's base, eval's generators)
    folder.rename(Model.folder_in(folder.parent))
    folder = Model.folder_in(folder.parent)
    for load, field in ((lambda: load_checkpoint(folder, False), "pretrain.from"),
                        (lambda: load_generator(folder, False), "qa.model.path"),
                        (lambda: load_embedder(folder, "cpu", trust_remote_code=False, field="index.embedder"),
                         "index.embedder"),
                        (lambda: upstream.load(False), "artifact")):
        with pytest.raises(InputError, match=rf"{field}: .* holds pickle weights only \(pytorch_model.bin\)"):
            load()
    assert not marker.exists()


# ---------------------------------------------------------------- the CLI, for real

GRISTMILL = [sys.executable, "-m", "flows.cli"]


def isolated_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI run whose every side file lands under `root` (its Prefect home
    and temporary server too: not the session's shared server)."""
    for name in ("prefect", "tmp", "hf", "home"):
        (root / name).mkdir(parents=True, exist_ok=True)
    inherited = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**inherited, "PREFECT_HOME": str(root / "prefect"), "TMPDIR": str(root / "tmp"),
            "HOME": str(root / "home"), "HF_HOME": str(root / "hf"), "HF_MODULES_CACHE": str(root / "hf" / "modules"),
            "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "INFO", **extra}


@pytest.fixture
def side() -> Iterator[Path]:
    """The root for `isolated_env`, on a short path: TMPDIR is under it, and a deep one (a pytest-xdist
    worker's temp folder) leaves no room for datatrove's socket (tasks/data/engine.py check_socket_dir)."""
    path = Path(tempfile.mkdtemp(prefix="gm-side-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def gristmill(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([*GRISTMILL, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def write_spec(folder: Path, name: str = "sec", **sections: Any) -> Path:
    body = {"name": name, "corpus": {"sources": [{"kind": "jsonl", "path": "data/*.jsonl", "id_field": "id"}]},
            **FAST, **sections}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def cli_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with tiny's documents; its store fills as the tests below run."""
    root = tmp_path_factory.mktemp("security")
    (root / "data").mkdir()
    shutil.copy(TINY_DOCS, root / "data" / "docs.jsonl")
    return root


def cli_in_process(args: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `gristmill ARGS` run by its entry point in this process: the same
    parsing, planning and Prefect flow as the command, without starting an interpreter and a
    Prefect server per call (on 2 loaded cores that is 20-40 s each). The flow runs on the session's
    server (tests/conftest.py), set in Prefect's settings: Prefect read them when first imported,
    before the server's URL was in the environment, and the CLI would start a server of its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()  # never closed: Prefect's console handler may keep the first it sees
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            temporary_settings({PREFECT_API_URL: os.environ.get("PREFECT_API_URL")}):
        code = main(args)
    return code, err.getvalue()


@pytest.mark.slow
def test_cli_refuses_a_pickle_only_pretrain_folder(cli_project: Path) -> None:
    marker = cli_project / "unpickled"
    folder = pickle_only_folder(cli_project, marker)
    spec = write_spec(cli_project, "pickled-pretrain", pretrain={**FAST["pretrain"], "from": str(folder)})
    code, err = cli_in_process(["run", str(spec), "--store", str(cli_project / "store"), "--until", "pretrain"])
    assert code == 2, err[-3000:]
    assert "pretrain.from: " in err and "holds pickle weights only (pytorch_model.bin)" in err
    assert not marker.exists()


def test_tokenizer_folder_with_only_a_pickle_is_refused(tmp_path: Path) -> None:
    from tasks.tokenizer import load_tokenizer_folder

    marker = tmp_path / "unpickled"
    with pytest.raises(InputError, match=r"tokenizer.from: .* is not a loadable tokenizer"):
        load_tokenizer_folder(pickle_only_folder(tmp_path, marker), False)
    assert not marker.exists()


CUSTOM_CODE = '''
import os, pathlib
pathlib.Path(os.environ["GRISTMILL_REMOTE_CODE_MARKER"]).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class CustomConfig(LlamaConfig):
    model_type = "gristmill_custom"

class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def remote_code_folder(root: Path) -> Path:
    """A real checkpoint whose config names its own code (auto_map), which writes a marker file."""
    folder = tiny_llama(root / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gristmill_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom_model.CustomConfig",
                            "AutoModelForCausalLM": "custom_model.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_model.py").write_text(CUSTOM_CODE)
    return folder


def flow_run_parameters(prefect_home: Path) -> list[dict[str, Any]]:
    """The parameters of every flow run in a Prefect home's database."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [json.loads(row[0]) for row in db.execute("select parameters from flow_run")]


def session_flow_runs(spec: Path) -> list:
    """The flow runs of `spec` (by its spec_path parameter) on the session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: os.environ["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200, sort=FlowRunSort.EXPECTED_START_TIME_DESC)
    return [run for run in runs if run.parameters.get("spec_path") == str(spec)]


@pytest.mark.slow
def test_remote_code_runs_only_with_the_cli_flag(cli_project: Path, side: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = cli_project / "remote-code-ran"
    monkeypatch.setenv("GRISTMILL_REMOTE_CODE_MARKER", str(marker))
    folder = remote_code_folder(cli_project)
    spec = write_spec(cli_project, "custom-code", pretrain={**FAST["pretrain"], "from": str(folder)})
    args = ["run", str(spec), "--store", str(cli_project / "store"), "--until", "pretrain"]

    code, err = cli_in_process(args)  # transformers refuses before it copies or imports the code
    assert code == 2, err[-3000:]
    assert "pretrain.from: " in err and "needs its own Python code" in err and "--trust-remote-code" in err
    assert not marker.exists()

    # With the flag, in a process of its own: the folder's code is imported (and copied into
    # HF_MODULES_CACHE, here a temp folder), so the marker appears and pretrain builds. Its flow
    # runs on the session's Prefect server (a temporary one costs ~20 s of CPU on 2 cores).
    before = {run.id for run in session_flow_runs(spec)}
    proc = gristmill([*args, "--trust-remote-code"], isolated_env(side, PREFECT_API_URL=os.environ["PREFECT_API_URL"]),
                     cli_project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "the folder's code ran"
    # The flag travelled as a Prefect flow parameter (the spec file has no such field).
    assert [run.parameters.get("trust_remote_code") for run in session_flow_runs(spec) if run.id not in before] == [True]


def test_a_spec_cannot_allow_remote_code_but_the_cli_can(tmp_path: Path) -> None:
    from tasks.core.runner import prepare_run

    spec = write_spec(tmp_path, trust_remote_code=True)
    with pytest.raises(InputError, match=r"trust_remote_code: a spec cannot allow remote code; pass --trust-remote-code"):
        load_spec(spec)
    spec = write_spec(tmp_path, pretrain={**FAST["pretrain"], "trust_remote_code": True})
    with pytest.raises(InputError, match=r"pretrain.trust_remote_code: a spec cannot"):
        load_spec(spec)
    with pytest.raises(InputError, match=r"trust_remote_code: a spec cannot"):  # nor can an override (eval's)
        prepare_run(write_spec(tmp_path), override=json.dumps({"trust_remote_code": True}))

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text(json.dumps({"id": "a", "text": doc_text(1)}) + "\n")
    store = str(tmp_path / "store")
    off = prepare_run(write_spec(tmp_path), store=store)
    on = prepare_run(write_spec(tmp_path), store=store, trust_remote_code=True)
    assert not off.spec.trust_remote_code and on.spec.trust_remote_code
    # The flag changes what may run, never what a stage outputs: the same fingerprints.
    assert [r.fingerprint for r in off.stages] == [r.fingerprint for r in on.stages]


# ---------------------------------------------------------------- the store's walls, and the key


@pytest.mark.parametrize("value", ["../escape", "/abs", "a/b", "..", ".hidden", "a\\b", "x" * 101])
def test_run_name_cannot_hold_a_path(tmp_path: Path, value: str) -> None:
    """The run name reaches Prefect (flow run and artifact names), never a path; it is kept to
    one plain word anyway, so no future use of it can escape a folder."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": value, "corpus": {"sources": [{"kind": "python_docs"}]}}))
    with pytest.raises(InputError, match=rf"{tmp_path}.*\n  name: "):
        load_spec(path)


def listing(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime) of every file and link under `root` outside the `skip` folders
    (a folder is listed without its mtime, which its new `skip` child changes: its entries are
    compared one by one)."""
    out = {}
    for path in [root, *root.rglob("*")]:
        if any(path == s or s in path.parents for s in skip):
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (0, 0) if path.is_dir() and not path.is_symlink() else (
            st.st_size, st.st_mtime_ns)
    return out


def key_forms(key: str) -> list[bytes]:
    """The key as bytes, and base64 of it at each of the three byte alignments it can have
    inside a longer base64 text (the stable middle of each)."""
    raw = key.encode()
    forms = [raw]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        forms.append(encoded[4 if shift else 0: -4])
    return forms


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and any(n in p.read_bytes() for n in needles)]


# Every stage, each as small as it can be: what is checked is where a run writes, not what it learns.
SMALLEST = {
    "tokenizer": {"vocab_size": 512},
    "pretrain": {"model": {"preset": "tiny", "context": 256}, "tokens": 8192, "batch_tokens": 2048,
                 "micro_batch": 8, "eval_every": 2, "checkpoint_every": 2},
    "midtrain": {"tokens": 4096, "batch_tokens": 2048, "micro_batch": 8, "eval_every": 1, "checkpoint_every": 1},
    # No grounded examples: with passages, a 256-token context can truncate every answer of the
    # validation split away, and sft then fails on a missing eval_loss (reported separately).
    "sft": {"lora": None, "epochs": 1, "batch_size": 16, "answer_sample": 4, "max_new_tokens": 8,
            "context_fraction": 0.0},
    "dpo": {"lora": {"r": 4, "alpha": 8}, "epochs": 1, "batch_size": 8, "max_new_tokens": 8, "max_pairs": 8},
    "index": {"chunk_words": 64, "overlap": 16},
    "eval": {"k": 3, "max_new_tokens": 8, "bootstrap": 100, "max_questions": 3},
}
HOSTILE_DOCS = [{"id": "../../../../escape-by-id", "text": doc_text(7)},
                {"id": "/absolute/escape-by-id", "text": doc_text(8)},
                {"id": "..", "text": doc_text(9)}]


@pytest.mark.slow
def test_a_full_run_writes_only_to_its_store_and_never_the_key(server, side: Path, tmp_path: Path,  # noqa: F811
                                                            one_layer_minilm: Path) -> None:
    """Every stage through the CLI, qa by the openai generator (a live fake endpoint) with
    the key in the environment variable the spec names, document ids and paths shaped like
    escapes. Then: the folders around the store are as they were, and the key (raw or base64)
    is in no file the run wrote, no output line and no Prefect flow run parameter."""
    state, base_url = server
    sandbox, project = tmp_path / "sandbox", tmp_path / "sandbox" / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(TINY_DOCS, project / "data" / "docs.jsonl")
    with (project / "data" / "docs.jsonl").open("a") as f:
        f.writelines(json.dumps(d) + "\n" for d in HOSTILE_DOCS)
    (project / "questions.jsonl").write_text("".join(json.dumps(
        {"id": f"../../q{i}", "question": f"What is document {i} about?", "answer": "python"}) + "\n" for i in range(3)))
    spec = project / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SMALLEST, "name": "walls..and.keys", "corpus": {"sources": [
        {"kind": "jsonl", "path": "../project/data/./*.jsonl", "text_field": "text", "id_field": "id"}]},
        "qa": {"generator": "openai", "per_doc": 1, "paraphrases": 1, "openai": {
            "base_url": base_url, "model": "fake", "api_key_env": KEY_ENV, "chunk_chars": 400, "timeout_s": 20}},
        "index": {**SMALLEST["index"], "embedder": str(one_layer_minilm)},  # a user's embedder folder, read only
        "eval": {**SMALLEST["eval"], "questions": "../project/questions.jsonl"}}))
    store = sandbox / "store"
    env = isolated_env(side, **{KEY_ENV: KEY})
    before = listing(tmp_path, skip=(store, side))

    proc = gristmill(["run", str(spec), "--store", str(store)], env, project, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert state.calls > 0  # the endpoint was used, with the key

    after = listing(tmp_path, skip=(store, side))
    assert after == before, {k: after.get(k) for k in set(after) ^ set(before) | {
        k for k in after if before.get(k) != after[k]}}
    needles = key_forms(KEY)
    assert not files_holding(store, needles) and not files_holding(side, needles)
    assert not any(n.decode() in proc.stdout + proc.stderr for n in needles)
    params = flow_run_parameters(side / "prefect")
    assert params and all("spec_path" in p for p in params)
    assert not any(n.decode() in json.dumps(params) for n in needles)
    # Outside the store only Prefect's home holds run data. Also written: matplotlib's font cache
    # (~/.cache/matplotlib/fontlist-*.json, the report's plots) and an empty torchinductor_<user>
    # folder in TMPDIR; nothing lands in the Hugging Face cache.
    leftovers = [p for name in ("tmp", "hf", "home") for p in (side / name).rglob("*") if not p.is_dir()]
    font_cache = side / "home" / ".cache" / "matplotlib"
    assert all(p.parent == font_cache and p.name.startswith("fontlist-") for p in leftovers), leftovers
