"""`synth/reference`: REFED synthesis as a Prefect flow. Wiring only; the method is
`flywheel.synthesis.refed`, and the world's part of it (teacher, responder, one-shot
format, which instructions it knows) is bound here, in `WorldRefedConfig` and
`make_teacher`."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import ConfigDict, Field, field_validator

from flywheel.flows.outputs import PlannedOutputs, reuse_or_write
from flywheel.flows.tracking import MODEL_CALLS, Deployment, FlowRun
from flywheel.llm import BackendSpec, make_backend, model_fingerprint
from flywheel.store import (
    Checkpoint,
    DatasetRef,
    data_root,
    failed_name,
    read_dataset,
    validate_name,
)
from flywheel.store.naming import validate_output_name
from flywheel.synthesis import refed as refed_module
from flywheel.synthesis import refed_outputs
from flywheel.synthesis import rouge as rouge_module
from flywheel.synthesis.refed import (
    RefedConfig,
    RefedRun,
    SeedDataError,
    Teacher,
    references_from_rows,
)
from flywheel.synthesis.refed_outputs import FAILED_SCHEMA, FEEDBACK_SCHEMA, SAMPLES_SCHEMA
from flywheel.world import teacher as world_teacher
from flywheel.world.bootstrap import model_dir, models_root
from flywheel.world.tasks import ONE_SHOT_TEMPLATE, parse_instruction, sample_tasks
from flywheel.world.teacher import WorldTeacher


def world_responder() -> BackendSpec:
    """The world's large model (made by `world/bootstrap`)."""
    return BackendSpec(kind="transformers", model=str(model_dir(models_root(), "large")))


class WorldRefedConfig(RefedConfig):
    """REFED with the world's defaults: its programmatic teacher, its large model as
    responder, and its one-shot format (`<instruction>=<answer>`, one line per answer)."""

    teacher: Literal["world", "llm"] = Field(
        "world", description="'world': the world's programmatic teacher; 'llm': teacher_backend"
    )
    responder: BackendSpec = Field(default_factory=world_responder)
    response_template: str = Field(
        ONE_SHOT_TEMPLATE,
        description="the responder's one-shot prompt; "
        "fields: {example_instruction}, {example_response}, {instruction}",
    )
    response_stop: list[str] | None = Field(["\n"], description="stop strings for responses")
    max_new_tokens: int = Field(16, ge=1, description="tokens per responder answer")


def make_teacher(config: RefedConfig) -> Teacher:
    """The world's teacher for teacher 'world'; REFED's LLM teacher otherwise."""
    if config.teacher == "world":
        return WorldTeacher(seed=config.seed)
    return refed_module.make_teacher(config)


def world_family(instruction: str) -> str | None:
    """The world task family of an instruction, None for one that is not a world task."""
    task = parse_instruction(instruction)
    return task.family if task else None


class ReferenceSynthParams(WorldRefedConfig):
    """Parameters of `synth/reference`: REFED's knobs plus where references come from."""

    model_config = ConfigDict(extra="forbid")

    seed_dataset: str | None = Field(
        None, description="store dataset with text columns instruction, response; null: world"
    )
    n_references: int = Field(24, ge=1, description="references sampled from the world")
    output: str = Field("reference_synth", description="name of the dataset to write")

    @field_validator("seed_dataset")
    @classmethod
    def _dataset_name(cls, name: str | None) -> str | None:
        return None if name is None else validate_name(name)

    @field_validator("output")
    @classmethod
    def _output_name(cls, name: str) -> str:
        # the run ends writing <output>_feedback and <output>__failed too
        return validate_output_name(name, field="output", suffixes=("_feedback",), failed=True)


def _world_references(params: ReferenceSynthParams) -> DatasetRef:
    """World tasks as references; the same seed and size reuse the version written before."""
    return reuse_or_write(
        "world_references",
        f"world:seed{params.seed}_n{params.n_references}",
        lambda: [t.as_row() for t in sample_tasks(params.n_references, random.Random(params.seed))],
    )


@task(name="check-inputs")
def check_inputs(params: ReferenceSynthParams) -> DatasetRef:
    """Fail fast, before any model is loaded: model paths, seed dataset columns and values."""
    params.responder.check()
    if params.teacher_backend is not None:
        params.teacher_backend.check()
    ref = read_dataset(params.seed_dataset) if params.seed_dataset else _world_references(params)
    source = f"dataset {ref.name}@{ref.version}"
    references = references_from_rows(ref.to_pandas().to_dict("records"), source)
    if params.teacher == "world":
        unknown = [r.instruction for r in references if parse_instruction(r.instruction) is None]
        if unknown:
            raise SeedDataError(
                f"{source}: teacher 'world' knows only world tasks, and {len(unknown)} "
                f"instruction(s) are not, e.g. {unknown[0]!r}; use teacher='llm' with a "
                "teacher_backend for other data"
            )
    return ref


SOURCE = hashlib.sha256(
    b"".join(Path(m.__file__).read_bytes() for m in (refed_module, rouge_module, world_teacher))
).hexdigest()


def _refed(params: ReferenceSynthParams, refs: DatasetRef) -> RefedRun:
    references = references_from_rows(refs.to_pandas().to_dict("records"), refs.name)
    config = RefedConfig.model_validate(params.model_dump(include=set(RefedConfig.model_fields)))
    # inputs, models and source: new weights or changed method code start afresh
    models = [model_fingerprint(config.responder)]
    if config.teacher_backend is not None:
        models.append(model_fingerprint(config.teacher_backend))
    key = Checkpoint.key(config.model_dump(mode="json"), refs.name, refs.version, models, SOURCE)
    workdir = data_root() / "_work" / "refed" / key
    return RefedRun(
        references,
        config,
        workdir,
        make_teacher(config),
        lambda: make_backend(config.responder),
        family_of=world_family,
    )


# REFED's stages in order, each run as its own task (retried on backend errors, resumed
# from the checkpoint); a stage's count shows on its task run
STAGES: dict[str, Callable[[RefedRun], int]] = {
    "collect-feedback": lambda run: len(run.feedback()),
    "synthesize-instructions": lambda run: sum(c["kept"] for c in run.instructions()),
    "generate-responses": lambda run: len(run.responses()),
    "refine-responses": lambda run: len(run.refine()),
}


@task(name="refed-stage", **MODEL_CALLS)
def refed_stage(params: ReferenceSynthParams, refs: DatasetRef, stage: str) -> int:
    with _refed(params, refs) as run:
        return STAGES[stage](run)


@dataclass(frozen=True)
class RefedOutputs:
    """What write-outputs wrote: the run's stats and {kind: `name@version`}."""

    stats: dict[str, Any]
    datasets: dict[str, str]


@task(name="write-outputs")
def write_outputs(params: ReferenceSynthParams, refs: DatasetRef, run_id: str) -> RefedOutputs:
    """Write failures, feedback and samples, each version planned once in the checkpoint."""
    with _refed(params, refs) as refed:
        rows, failed, stats = refed.result()
        feedback_rows = refed_outputs.feedback_rows(refed.feedback())
    output = params.output
    names = {"feedback": f"{output}_feedback", "samples": output, "failed": failed_name(output)}
    out = PlannedOutputs(refed.ckpt, names, run_id)
    failures = out.write("failed", failed, [refs], FAILED_SCHEMA)
    feedback = out.write("feedback", feedback_rows, [refs], FEEDBACK_SCHEMA)
    samples = out.write("samples", rows, [refs, feedback], SAMPLES_SCHEMA)
    stats["reused_earlier_output"] = out.reused
    written = {"feedback": feedback, "samples": samples, "failed": failures}
    return RefedOutputs(stats, {k: f"{ref.name}@{ref.version}" for k, ref in written.items()})


REFERENCE = Deployment("synth/reference", "REFED synthesis", ReferenceSynthParams)


@REFERENCE.flow(check=check_inputs)
def reference(params: ReferenceSynthParams, refs: DatasetRef, run: FlowRun) -> dict:
    """REFED: reference-level feedback guided synthesis (see flywheel.synthesis.refed)."""
    for stage in STAGES:
        refed_stage.with_options(name=stage)(params, refs, stage)
    out = write_outputs(params, refs, run.id)
    figures = refed_outputs.summary_figures(out.stats)
    figures |= {f"dataset: {k}": v for k, v in out.datasets.items()}
    run.summary(figures)
    return {"stats": out.stats, "datasets": out.datasets, "seconds": figures["seconds"]}
