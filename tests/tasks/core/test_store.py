"""The store: atomic publish, partial folders never count, one artifact per fingerprint."""

import multiprocessing
from pathlib import Path

from tasks.core.runner import execute, plan
from tasks.core.store import RECORD, ArtifactRecord, ArtifactStore, now_iso


def record(fp: str = "f1") -> ArtifactRecord:
    return ArtifactRecord(stage="s", fingerprint=fp, run_name="r", key={}, metrics={"n": 1},
                          files={}, wall_s=0.1, versions={}, created_at=now_iso())


def test_publish_is_visible_only_with_its_record(tmp_path):
    store = ArtifactStore(tmp_path)
    build = store.new_build_dir("s", "f1")
    (build / "payload.txt").write_text("x")
    assert store.load("s", "f1") is None
    assert build.name.startswith(".tmp-")
    path = store.publish(build, record())
    assert Path(path, "payload.txt").read_text() == "x"
    assert store.load("s", "f1").metrics == {"n": 1}
    assert not build.exists()


def test_folder_without_record_is_not_done_and_is_cleared(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = tmp_path / "s" / "f1"
    partial.mkdir(parents=True)
    (partial / "half.txt").write_text("half")
    leftover = store.new_build_dir("s", "f1")
    assert store.load("s", "f1") is None
    assert store.history("s") == []
    store.clear_stale_builds("s", "f1")
    assert not partial.exists() and not leftover.exists()


def test_torn_record_is_not_done(tmp_path):
    store = ArtifactStore(tmp_path)
    (tmp_path / "s" / "f1").mkdir(parents=True)
    (tmp_path / "s" / "f1" / RECORD).write_text('{"stage": "s", "finger')
    assert store.load("s", "f1") is None


def test_forced_publish_replaces_the_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    for content in ("old", "new"):
        build = store.new_build_dir("s", "f1")
        (build / "payload.txt").write_text(content)
        store.publish(build, record())
    assert (tmp_path / "s" / "f1" / "payload.txt").read_text() == "new"
    assert [p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")] == ["f1"]


def _run_spec(spec_path: str, store: str, queue) -> None:
    from data_specs.loader import load_spec

    spec = load_spec(spec_path)
    st = ArtifactStore(store)
    queue.put([execute(row, spec, st).state for row in plan(spec, st)[:2]])  # ingest, dedup


def test_two_processes_build_once(project):
    """Started together, both succeed; one builds each stage, the other reuses it."""
    spec_path = project.write()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_spec, args=(str(spec_path), str(project.store.root), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    states = sorted(queue.get() for _ in procs)
    assert sorted(s for run in states for s in run).count("built") == 2  # each stage built once
    for stage in ("ingest", "dedup"):
        done = [p for p in (Path(project.store.root) / stage).iterdir() if not p.name.startswith(".")]
        assert len(done) == 1 and (done[0] / RECORD).exists()


def test_gzip_outputs_are_reproducible(tmp_path):
    import gzip

    from tasks.core.files import make_gzip_reproducible

    paths = []
    for i, mtime in enumerate((1000, 2000)):
        path = tmp_path / f"{i}" / "x.jsonl.gz"
        path.parent.mkdir()
        with open(path, "wb") as raw, gzip.GzipFile("x.jsonl", "wb", fileobj=raw, mtime=mtime) as f:
            f.write(b'{"a": 1}\n')
        paths.append(path)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    for path in paths:
        make_gzip_reproducible(path.parent)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert gzip.decompress(paths[0].read_bytes()) == b'{"a": 1}\n'
