"""The pipeline's stages in order. A new stage is one module in tasks/ plus one line here."""

from data_specs.spec import RunSpec
from tasks import dedup, dpo, evaluate, index, ingest, midtrain, pretrain, qa, sft, tokenizer
from tasks.errors import InputError
from tasks.stage import Stage

STAGES: tuple[Stage, ...] = (ingest.STAGE, dedup.STAGE, tokenizer.STAGE, pretrain.STAGE, qa.STAGE, midtrain.STAGE, sft.STAGE, dpo.STAGE,
                                 index.STAGE, evaluate.STAGE)


# The stages that train or run a model. Under `gristmill run --gpu-deployment` they run as flow
# runs of the one-stage deployment on the GPU work pool; the data stages stay on the CPU pool.
GPU_STAGES: frozenset[str] = frozenset({"pretrain", "midtrain", "sft", "dpo", "eval"})


def gpu_count(spec: RunSpec, name: str) -> int:
    """GPUs a stage asks its work pool for: the spec's `resources.<stage>.gpus`, else 1."""
    return getattr(getattr(spec.resources, name, None), "gpus", 1)


def stage_names() -> list[str]:
    """Names of every stage, in pipeline order."""
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    """The stage called `name`; an unknown name is bad input that lists the known ones."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise InputError(f"unknown stage {name!r}; stages are: {', '.join(stage_names())}")
