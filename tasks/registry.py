"""The pipeline's stages in order. A new stage is one module in tasks/ plus one line here."""

from tasks import dedup, dpo, evaluate, index, ingest, midtrain, pretrain, qa, sft, tokenizer
from tasks.errors import InputError
from tasks.stage import Stage

STAGES: tuple[Stage, ...] = (ingest.STAGE, dedup.STAGE, tokenizer.STAGE, pretrain.STAGE, qa.STAGE, midtrain.STAGE, sft.STAGE, dpo.STAGE,
                                 index.STAGE, evaluate.STAGE)


def stage_names() -> list[str]:
    """Names of every stage, in pipeline order."""
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    """The stage called `name`; an unknown name is bad input that lists the known ones."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise InputError(f"unknown stage {name!r}; stages are: {', '.join(stage_names())}")
