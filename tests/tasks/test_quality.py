"""quality: the default filters keep the reference docs and remove planted junk with the right
reasons, every removal is kept and counted, PII is replaced and counted by kind, a filter that
removes everything is bad input naming its threshold, and the spec names bad filter settings."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter

from data_specs.errors import InputError
from data_specs.schema import C4QualitySpec, GopherQualitySpec, GopherRepetitionSpec, PIISpec, filter_parameter
from tasks.core.artifacts import Documents, iter_documents
from tasks.core.jsonl import read_jsonl
from tasks.core.runner import execute, plan
from tasks.data.python_docs import write_python_docs
from tasks.data.quality_filters import CountingPII, KeepText
from tests.conftest import SpecFactory, write_jsonl
from tests.tasks.test_pretrain import tiny_project

LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex "
         "ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu "
         "fugiat nulla pariatur.")
PII_DOC = ("Questions about the tools go to the maintainers at help.desk@example.com or to ops-team@example.org. "
           "The mirror at 8.8.8.8 is public; the test server at 192.168.0.1 is private and stays as it is.\n\n"
           "The rest of this page describes the release process of the project and the checks that run before "
           "a release is tagged, with the commands to run them on your own machine.")


def junk() -> dict[str, str]:
    """The planted junk, each with the filter and reason it must leave with (in EXPECTED)."""
    rng = random.Random(0)
    symbols = ["%%", "&&", "=>", ";;", "|", "~", "^^", "{}", "[]", "<>", "$$", "*/", "!="]
    soup = "\n".join(" ".join(rng.choice(symbols) if i % 2 else str(rng.randint(100, 99999)) for i in range(12))
                     for _ in range(8))
    names = ["alice.smith", "bob.jones", "carol.white", "dave.brown", "erin.green", "frank.black", "grace.hall"]
    hosts = ["example.com", "example.org", "mail.example.net"]
    return {
        "junk:repeated-lines": "\n".join(["Click here to subscribe to our newsletter for the latest updates."] * 30),
        "junk:symbol-soup": soup,
        "junk:lorem-ipsum": ("Welcome to the documentation of the project. This page is a placeholder that will be "
                             "replaced with the final text.\n\n" + LOREM + "\n\n" + LOREM.replace("Lorem", "Sed")
                             + "\n\nPlease come back to the site later for the full documentation of the tools."),
        "junk:e-mail-addresses": "Contacts\n\n" + "\n".join(f"{n}{i}@{hosts[i % 3]}" for i in range(4) for n in names),
    }


EXPECTED = {  # id -> (filter, datatrove's reason)
    "junk:repeated-lines": ("gopher_repetition", "dup_line_frac"),
    "junk:symbol-soup": ("gopher_quality", "gopher_below_alpha_threshold"),
    "junk:lorem-ipsum": ("c4", "lorem_ipsum"),
    "junk:e-mail-addresses": ("gopher_quality", "gopher_above_avg_threshold"),
}


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """Every pydoc_data.topics document of the built-in corpus, the planted junk and one document
    with personal data, through ingest, dedup and quality with the default filters and PII on."""
    root = tmp_path_factory.mktemp("quality")
    write_python_docs(root / "python_docs.jsonl")
    topics = [d for d in read_jsonl(root / "python_docs.jsonl") if d["id"].startswith("topic:")]
    write_jsonl(root / "data" / "docs.jsonl", [{"id": d["id"], "text": d["text"]} for d in topics]
                + [{"id": i, "text": t} for i, t in junk().items()] + [{"id": "contacts-page", "text": PII_DOC}])
    factory = SpecFactory(root)
    spec = factory.load(dedup={"near": None}, quality={"pii": {"emails": True, "ips": True}})
    results = {row.name: execute(row, spec, factory.store) for row in plan(spec, factory.store)
               if row.name in ("ingest", "dedup", "quality")}
    return results, {d["id"] for d in topics}


def test_planted_junk_is_removed_with_the_right_reasons(filtered):
    results, _ = filtered
    folder = Path(results["quality"].path)
    removed = {r["id"]: (r["filter"], r["reason"]) for r in read_jsonl(folder / "removed.jsonl")}
    assert {i: removed.get(i) for i in EXPECTED} == EXPECTED
    # The exclusion writers keep each removed document whole, with datatrove's reason.
    for doc_id, (name, reason) in EXPECTED.items():
        kept = {d["id"]: d for d in iter_documents(folder / "removed" / name)}
        assert kept[doc_id]["text"] == junk()[doc_id] and kept[doc_id]["metadata"]["filter_reason"] == reason


def test_no_pydoc_topic_is_removed_by_the_defaults(filtered):
    results, topics = filtered
    kept = {d["id"] for d in iter_documents(Path(results["quality"].path) / Documents.FOLDER)}
    assert len(topics) > 50 and topics <= kept
    removed = {r["id"] for r in read_jsonl(Path(results["quality"].path) / "removed.jsonl")}
    assert removed == set(EXPECTED)  # nothing but the junk
    assert results["quality"].record.metrics["documents_out"] == len(topics) + 1  # and the contacts page


def test_every_document_is_counted(filtered):
    results, _ = filtered
    m = results["quality"].record.metrics
    assert m["documents_in"] == results["dedup"].record.metrics["documents_out"]
    assert m["documents_in"] == m["documents_out"] + sum(m["rejected_by_filter"].values())
    assert m["rejected_by_filter"] == {"gopher_repetition": 1, "gopher_quality": 2, "c4": 1}
    assert m["rejected_by_reason"]["gopher_quality"] == {"gopher_above_avg_threshold": 1,
                                                         "gopher_below_alpha_threshold": 1}
    removed = read_jsonl(Path(results["quality"].path) / "removed.jsonl")
    assert sum(r["chars"] for r in removed) == sum(len(t) for t in junk().values())
    # The rest of chars_in, less the removed, is chars_out but for the replacements' lengths (PII on).
    assert abs(m["chars_in"] - sum(r["chars"] for r in removed) - m["chars_out"]) < 20


def test_pii_is_replaced_and_counted_by_kind(filtered):
    results, _ = filtered
    assert results["quality"].record.metrics["pii"] == {"emails": 2, "ips": 1}  # 192.168.0.1 is private
    text = next(d["text"] for d in iter_documents(Path(results["quality"].path) / Documents.FOLDER)
                if d["id"] == "contacts-page")
    assert "help.desk@example.com" not in text and "8.8.8.8" not in text and "192.168.0.1" in text
    assert "email@example.com" in text


def test_the_data_card(filtered):
    results, topics = filtered
    folder = Path(results["quality"].path)
    card = json.loads((folder / Documents.CARD).read_text())
    assert [(s["stage"], s["documents"]) for s in card["stages"]] == [
        ("ingest", len(topics) + 5), ("dedup", len(topics) + 5), ("quality", len(topics) + 1)]
    [source] = card["sources"]
    assert source["kind"] == "jsonl" and source["documents"] == {"ingest": len(topics) + 5, "dedup": len(topics) + 5,
                                                                "quality": len(topics) + 1}
    c4 = next(f for f in card["filters"] if f["filter"] == "c4")
    assert c4["removed"] == 1 and c4["share_removed"] == round(1 / (len(topics) + 5), 4)
    assert c4["parameters"] == {"lorem_ipsum": "filter_lorem_ipsum"}
    assert c4["examples"] == [{"id": "junk:lorem-ipsum", "reason": "lorem_ipsum", "chars": len(junk()["junk:lorem-ipsum"]),
                               "first_line": "Welcome to the documentation of the project. This page is a placeholder "
                                             "that will be replaced with the final text."}]
    assert card["pii"] == {"emails": 2, "ips": 1}
    assert [sum(n) for n in card["lengths"]["stages"].values()] == [len(topics) + 5, len(topics) + 1]
    assert (folder / Documents.LENGTHS).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_shows_the_data_card(filtered, tmp_path):
    """eval finds the card through its lineage (the last upstream artifact holding one) and the
    report's lineage section shows it: stages, filters with reasons, PII, lengths, first lines."""
    from eval.report import markdown
    from tasks.core.stage import RunContext
    from tasks.evaluation.lineage import data_card

    results, _ = filtered
    ctx = RunContext(work=tmp_path, trust_remote_code=False, spec_path=tmp_path / "spec.yaml",
                     lineage={name: r.record for name, r in results.items()},
                     fetch=lambda name, rel: (p if (p := Path(results[name].path) / rel).is_file() else None))
    card = data_card(ctx)
    assert card == json.loads((Path(results["quality"].path) / Documents.CARD).read_text())
    summary = {"verdict": "v", "questions": 0, "question_source": "s", "max_new_tokens": 1, "k": 1,
               "retrieval": {"retriever": "bm25", "strict": {}, "lenient": {}}, "design": [], "arms": {},
               "comparisons": [], "stages": [], "lineage": {}, "disagreements": [], "data_card": card}
    md = markdown(summary, {"f1": "f1.png", "lengths": "lengths.png"})
    assert "### Data card" in md and "![Document lengths](lengths.png)" in md
    assert "| c4 | " in md and "lorem_ipsum 1 (filter_lorem_ipsum)" in md
    assert "Personal data replaced: 2 e-mail address(es), 1 IP address(es)." in md
    assert "| gopher_repetition | junk:repeated-lines | dup_line_frac |" in md
    without = data_card(RunContext(work=tmp_path, trust_remote_code=False, spec_path=tmp_path,
                                   lineage={n: r.record for n, r in results.items() if n != "quality"}))
    assert without is None and "skipped the quality stage" in markdown({**summary, "data_card": None}, {"f1": "f1.png"})


# ---------------------------------------------------------------- a corpus left empty, a custom filter


def run_quality(factory: SpecFactory, **quality):
    spec = factory.load(**factory.sections, quality=quality)
    return {row.name: execute(row, spec, factory.store) for row in plan(spec, factory.store)
            if row.name in ("ingest", "dedup", "quality")}


def test_a_filter_that_removes_everything_is_bad_input_naming_its_threshold(tmp_path):
    factory = tiny_project(tmp_path)
    with pytest.raises(InputError, match=r"quality\.filters\.1 \(c4\)\.min_num_sentences \(1000\) removed 30 of 30 "
                                         r"documents \(too_few_sentences: 30; 30 entered the stage\)"):
        run_quality(factory, filters=[{"name": "gopher_quality"}, {"name": "c4", "min_num_sentences": 1000}])
    assert not any((p / "artifact.json").exists() for p in (factory.store.local_root / "quality").glob("*"))


def test_a_custom_regex_filter_removes_with_its_reason(tmp_path):
    results = run_quality(tiny_project(tmp_path), filters=[{"name": "regex", "pattern": "(?m)^# (glob|fnmatch)$",
                                                           "reason": "filename_matching"}])
    rows = read_jsonl(Path(results["quality"].path) / "removed.jsonl")
    assert {(r["id"], r["filter"], r["reason"]) for r in rows} == {
        ("module:glob", "filename_matching", "filename_matching"),
        ("module:fnmatch", "filename_matching", "filename_matching")}
    assert results["quality"].record.metrics["rejected_by_filter"] == {"filename_matching": 2}


# ---------------------------------------------------------------- the blocks and the spec


def test_c4_gives_its_verdict_and_leaves_the_text_as_it_was():
    text = "Use it like this:\n\n    for x in range(3):\n        print(x)\n\nIt prints three numbers, one per line."
    doc = Document(text=text, id="a")
    assert KeepText(C4QualityFilter(min_num_sentences=1)).filter(doc) is True and doc.text == text
    bare = Document(text=text, id="b")
    assert C4QualityFilter(min_num_sentences=1).filter(bare) is True and bare.text != text  # what it would do


def test_pii_counts_survive_the_executors_copy_of_the_pipeline():
    pii = copy.deepcopy(CountingPII(PIISpec(ips=False)))  # datatrove runs a deep copy per rank
    [doc] = pii.run(iter([Document(text="a@example.org, b@example.org and 8.8.8.8", id="x")]))
    assert pii.stats["pii_emails"].total == 2 and "pii_ips" not in pii.stats.stats and "8.8.8.8" in doc.text


@pytest.mark.parametrize("spec, reason, parameter", [
    (GopherRepetitionSpec(), "top_3_gram", "top_n_grams"), (GopherRepetitionSpec(), "duplicated_7_n_grams", "dup_n_grams"),
    (GopherRepetitionSpec(), "dup_line_frac", "dup_line_frac"), (GopherQualitySpec(), "gopher_short_doc", "min_doc_words"),
    (C4QualitySpec(), "too_few_sentences", "min_num_sentences"), (C4QualitySpec(), "something_else", None),
])
def test_each_reason_names_its_parameter(spec, reason, parameter):
    assert filter_parameter(spec, reason) == parameter


@pytest.mark.parametrize("quality, message", [
    ({"filters": [{"name": "gopher_quality", "min_words": 3}]}, "quality.filters.0.gopher_quality.min_words: Extra inputs"),
    ({"filters": [{"name": "gopher"}]}, "does not match any of the expected tags: 'gopher_repetition', 'gopher_quality', "
                                        "'c4', 'fineweb', 'regex'"),
    ({"filters": [{"min_doc_words": 3}]}, "filters.0: every filter needs a `name`"),
    ({"filters": [{"name": "c4_badwords"}]}, "'c4_badwords' filter is not offered: it downloads its word list"),
    ({"filters": [{"name": "regex", "pattern": "(("}]}, "quality.filters.0.regex.pattern: Value error, not a valid"),
    ({"filters": [{"name": "regex", "pattern": "a"}, {"name": "regex", "pattern": "b"}]}, "regex named more than once"),
    ({"filters": [{"name": "gopher_repetition", "top_n_grams": [[2, 1.5]]}]},
     "quality.filters.0.gopher_repetition.top_n_grams.0.1: Input should be less than or equal to 1"),
    ({"filters": []}, "no filters and no pii: set `quality: null`"),
    ({"language": "xx"}, "quality.language: Value error, datatrove has no word tokenizer for 'xx'"),
    ({"pii": {"email": True}}, "quality.pii.email: Extra inputs"),
])
def test_bad_filter_settings_name_the_field(project, quality, message):
    path = project.write(quality=quality)
    with pytest.raises(InputError) as e:
        project.load(quality=quality)
    assert str(path) in str(e.value) and message in str(e.value)
