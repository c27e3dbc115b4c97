"""The pipeline, in one place: every stage and, by role, the artifacts it reads.

Read it like a script. Each line wires one stage (a module in tasks/) to earlier bindings: a
stage's name, or the name an earlier line `provides`. "corpus" is the documents every consumer
trains and retrieves from; the quality filters, inserted after dedup, take it over in one line.
`quality: null` in a spec skips that stage (it is `optional`), and "corpus" is dedup's again.

The graph is checked when this module is imported (tasks/core/graph.py): known sections, each
stage once, every role bound to an earlier stage that makes the right kind of artifact.
"""

from tasks import dedup, dpo, evaluate, index, ingest, midtrain, pretrain, qa, quality, reader, sft, tokenizer
from tasks.core.graph import Graph, Wire

PIPELINE = Graph(
    Wire(ingest.STAGE),
    Wire(dedup.STAGE, documents="ingest", provides="corpus"),
    Wire(quality.STAGE, documents="corpus", provides="corpus"),
    Wire(tokenizer.STAGE, documents="corpus"),
    Wire(pretrain.STAGE, documents="corpus", tokenizer="tokenizer"),
    Wire(qa.STAGE, documents="corpus"),
    Wire(midtrain.STAGE, model="pretrain", documents="corpus", pairs="qa"),
    Wire(sft.STAGE, model="midtrain", pairs="qa", documents="corpus"),
    Wire(dpo.STAGE, model="sft", pairs="qa"),
    Wire(index.STAGE, documents="corpus"),
    # The reader starts where sft did, with sft's recipe, on grounded examples only (tasks/reader.py).
    Wire(reader.STAGE, model="midtrain", pairs="qa", index="index"),
    Wire(evaluate.STAGE, finetuned="dpo", reader="reader", pairs="qa", index="index"),
)
