"""The `rule` Q&A generator: questions from the structure of a document, answers cut from it.

Offline and deterministic. Each rule finds a structure in the text and cuts the answer out of
the document as an exact span, so every answer can be found verbatim at its recorded
offsets. The rules, with the question each one asks:

    member     "## name(sig)" / "### Class.meth(sig)" + docstring -> what does `mod.name()` do?
                                                                    (its first sentence)
    signature  "## name(a, b=1)"                                  -> what are the parameters?
    grammar    "   assert_stmt ::= ..."                           -> the production's right side
    module     "# name" + first paragraph of a module             -> what is the module for?
    definition "Assert statements are a convenient way ..."       -> what are assert statements?

Question templates come in several wordings: the first is the question, the others serve as
offline paraphrases (Ovadia et al. 2023: rewordings help fine-tuning absorb facts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import zip_longest

from tasks.qagen.common import Pair

TEMPLATES: dict[str, tuple[str, ...]] = {
    "member": ("What does `{x}` do?", "What is `{x}` used for?", "Explain what `{x}` does.",
               "What is the purpose of `{x}`?", "Describe the behaviour of `{x}`."),
    "signature": ("What are the parameters of `{x}`?", "What arguments does `{x}` take?",
                  "What is the signature of `{x}`?", "Which parameters does `{x}` accept?"),
    "grammar": ("What is the grammar rule for `{x}`?", "How is `{x}` defined in the Python grammar?",
                "What does the grammar production `{x}` expand to?"),
    "module": ("What is the `{x}` module for?", "What does the `{x}` module provide?",
               "Summarize the purpose of the `{x}` module.", "What is Python's `{x}` module about?"),
    "definition": ("What {be} {x}?", "How would you describe {x}?", "Define {x}.", "Explain what {x} {be}."),
}

_MEMBER = re.compile(r"^(#{2,3}) ([A-Za-z_][\w.]*)\((.*)\)[ \t]*$", re.M)
_GRAMMAR = re.compile(r"^[ \t]+([a-z_][a-z0-9_]*)[ \t]+::=[ \t]+(\S.*?)[ \t]*$", re.M)
_DEFINITION = re.compile(r"(?:^|(?<=\.\s))((?:(?:A|An|The) [a-z]+|[A-Z][a-z]+|\"\w+\")(?: [a-z\"]+\w*\"?){0,3}) (is|are) "
                         r"((?:a|an|the|one) [^.:\n]*(?:\n[^.:\n]+)*[.:])", re.M)
# Sentence openers that are not the thing being defined ("If the value is a ...").
_NOT_SUBJECTS = {"This", "That", "It", "There", "These", "Those", "Which", "What", "If", "When", "Otherwise",
                 "Then", "Here", "Note", "Also", "Since", "Because", "Unless", "While", "Where", "Each", "Both"}
_SENTENCE_END = re.compile(r"[.:](?=\s|$)")


def _first_sentence(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Span of the first sentence of the first paragraph in text[start:end] (skips blank lines)."""
    while start < end and text[start] in " \t\n":
        start += 1
    para_end = text.find("\n\n", start, end)
    para_end = end if para_end < 0 else para_end
    m = _SENTENCE_END.search(text, start, para_end)
    stop = m.end() if m else para_end
    return (start, stop) if stop > start else None


def _question(kind: str, variant: int, **fields: str) -> str:
    templates = TEMPLATES[kind]
    return templates[variant % len(templates)].format(**fields)


def _module_name(doc_id: str, text: str) -> str | None:
    """The module a doc describes ("module:json" -> "json"); None for topic documents."""
    return doc_id.split(":", 1)[1] if doc_id.startswith("module:") else None


def member_pairs(doc_id: str, text: str) -> Iterator[Pair]:
    """`member` and `signature` pairs from "## name(sig)" sections and their docstrings."""
    module = _module_name(doc_id, text)
    heads = list(_MEMBER.finditer(text))
    for i, head in enumerate(heads):
        name = f"{module}.{head.group(2)}" if module else head.group(2)
        body_end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        sentence = _first_sentence(text, head.end(), body_end)
        if sentence and not text[sentence[0]:].startswith("#"):
            yield Pair(_question("member", 0, x=f"{name}()"), text[sentence[0]:sentence[1]], doc_id, sentence, "rule:member")
        if head.group(3).strip() and head.group(3).strip() not in ("self", "cls"):
            span = head.span(3)
            yield Pair(_question("signature", 0, x=f"{name}()"), text[span[0]:span[1]], doc_id, span, "rule:signature")


def grammar_pairs(doc_id: str, text: str) -> Iterator[Pair]:
    """`grammar` pairs: the right side of the first line of each production."""
    for m in _GRAMMAR.finditer(text):
        yield Pair(_question("grammar", 0, x=m.group(1)), m.group(2), doc_id, m.span(2), "rule:grammar")


def module_pairs(doc_id: str, text: str) -> Iterator[Pair]:
    """A `module` pair: the first sentence of a module's docstring."""
    module = _module_name(doc_id, text)
    if module is None or not text.startswith("# "):
        return
    first_line_end = text.find("\n")
    next_head = text.find("\n#", first_line_end)
    sentence = _first_sentence(text, first_line_end, len(text) if next_head < 0 else next_head)
    if sentence:
        yield Pair(_question("module", 0, x=module), text[sentence[0]:sentence[1]], doc_id, sentence, "rule:module")


def definition_pairs(doc_id: str, text: str) -> Iterator[Pair]:
    """`definition` pairs: "X is a Y." sentences."""
    for m in _DEFINITION.finditer(text):
        subject = m.group(1)
        words = subject.split()
        if words[0] in _NOT_SUBJECTS or words[-1] in ("following", "same", "other", "result", "value"):
            continue
        answer_span = (m.start(3), m.end(3) - 1)  # without the closing period
        subject_text = subject[0].lower() + subject[1:] if not subject.startswith('"') else subject
        yield Pair(_question("definition", 0, x=subject_text, be=m.group(2)), text[answer_span[0]:answer_span[1]],
                   doc_id, answer_span, "rule:definition")


RULES = (module_pairs, member_pairs, grammar_pairs, definition_pairs)


def rule_pairs(doc_id: str, text: str) -> list[Pair]:
    """Every rule's pairs for one document, interleaved so a per-document cap keeps variety."""
    per_rule = [list(rule(doc_id, text)) for rule in RULES]
    return [p for group in zip_longest(*per_rule) for p in group if p is not None]


def paraphrases(pair: Pair, k: int) -> list[str]:
    """Up to k other wordings of a rule question (the templates after the one it used)."""
    kind = pair.generator.split(":", 1)[1]
    for variant, template in enumerate(TEMPLATES[kind]):
        pattern = "^" + re.escape(template).replace(r"\{x\}", "(?P<x>.+)").replace(r"\{be\}", "(?P<be>is|are)") + "$"
        m = re.match(pattern, pair.question)
        if m:
            fields = m.groupdict()
            return [_question(kind, variant + i, **fields) for i in range(1, min(k, len(TEMPLATES[kind]) - 1) + 1)]
    return []
