"""`reward/relabel`: one UGDA round on a registered reward ensemble. Wiring only; the
method is `flywheel.reward_models.ugda`, the labelers `flywheel.reward_models.labelers`
(the world's oracle: `flywheel.world.labelers`).

With `labeler: human` a run writes the selected pairs as a queue dataset and stops; the
next run finds the labeled file, checks it against the queue and refines the ensemble.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prefect import task

from flywheel.flows.outputs import write_once
from flywheel.flows.relabel_params import DEFAULT_ENSEMBLE, RelabelParams
from flywheel.flows.reward import RewardTrainParams, train_flow
from flywheel.flows.tracking import MODEL_CALLS, Deployment, FlowRun, length_figures, model_inputs
from flywheel.llm import make_backend, model_fingerprint
from flywheel.reward_models import relabeling
from flywheel.reward_models.labelers import LLMJudgeLabeler
from flywheel.reward_models.relabeling import CANDIDATE_SCHEMA, QueueBook
from flywheel.store import (
    Checkpoint,
    DatasetRef,
    ModelNotRegistered,
    ModelRef,
    data_root,
    read_dataset,
    read_model,
)
from flywheel.store.naming import new_version
from flywheel.world.labelers import WorldOracleLabeler
from flywheel.world.tasks import sample_tasks


@dataclass(frozen=True)
class PolicySamples:
    """What sample-policy hands on: the candidate policy pairs, the labelled validation
    pairs, and what sampling skipped (`policy_pairs`' report)."""

    candidates: list[dict]
    validation: list[dict]
    report: dict


@task(name="check-inputs")
def check_inputs(params: RelabelParams) -> ModelRef:
    """Fail before sampling: the ensemble, the policy, the labeler's settings, the data."""
    params.policy.check()
    if params.labeler == "llm":
        params.judge.check()  # RelabelParams requires a judge for labeler 'llm'
    relabeling.check_datasets(params.prompts_dataset, params.validation_dataset)
    try:
        ensemble = read_model(params.ensemble)
    except ModelNotRegistered:
        if params.ensemble != DEFAULT_ENSEMBLE:
            raise
        # the nightly default bootstraps itself from the world's pairs
        train_flow(RewardTrainParams(kind="ensemble", members=3, seed=params.seed))
        ensemble = read_model(params.ensemble)
    return relabeling.check_ensemble(ensemble)


def _workdir(params: RelabelParams, ensemble: ModelRef) -> Checkpoint:
    key = Checkpoint.key(
        params.model_dump(mode="json", exclude={"labels_file"}),
        f"{ensemble.name}@{ensemble.version}",
        model_fingerprint(params.policy),
    )
    return Checkpoint(data_root() / "_work" / "relabel" / key)


@task(name="sample-policy", **MODEL_CALLS)
def sample_policy(params: RelabelParams, ensemble: ModelRef) -> PolicySamples:
    """Two responses per prompt from the current policy; validation pairs: the given ones,
    or world oracle labels of policy pairs on separate world tasks. Kept in the run's
    checkpoint, so a re-run samples nothing again."""
    ckpt = _workdir(params, ensemble)
    if cached := ckpt.get("policy"):
        return PolicySamples(**cached)
    if params.prompts_dataset:
        prompts, more = relabeling.read_text_prompts(params.prompts_dataset), []
    else:
        rng = random.Random(f"relabel-{params.seed}")
        tasks = sample_tasks(params.n_prompts + params.n_validation_prompts, rng)
        texts = [t.prompt for t in tasks]
        prompts, more = texts[: params.n_prompts], texts[params.n_prompts :]
    given = params.validation_dataset
    with make_backend(params.policy) as policy:
        out = relabeling.sample_round(
            policy,
            prompts,
            params.sampling(),
            params.ugda(),
            validation=relabeling.read_pairs(given) if given else None,
            validation_prompts=more,
            oracle=WorldOracleLabeler(),
        )
    ckpt.put("policy", out)
    return PolicySamples(**out)


@task(name="score-and-select")
def score_and_select(
    params: RelabelParams, ensemble: ModelRef, sampled: PolicySamples
) -> list[dict]:
    ckpt = _workdir(params, ensemble)
    if cached := ckpt.get("selection"):
        return cached
    config = params.ugda()
    rows = relabeling.scored_rows(ensemble.path, sampled.candidates, sampled.validation, config)
    ckpt.put("selection", rows)
    return rows


@task(name="label", **MODEL_CALLS)
def label(params: RelabelParams, selected: list[dict]) -> tuple[list[dict], list[dict]]:
    if params.labeler == "world":
        return WorldOracleLabeler().label(selected)
    assert params.judge is not None  # RelabelParams requires it for labeler 'llm'
    with make_backend(params.judge) as judge:
        labeler = LLMJudgeLabeler(
            judge, seed=params.seed, max_new_tokens=params.judge_max_new_tokens
        )
        return labeler.label(selected)


# a planned version: a re-run reuses it
refine_ensemble = task(name="refine-ensemble")(relabeling.refine_version)


def _prompt_inputs(params: RelabelParams) -> list[DatasetRef]:
    """The user's prompts and validation datasets, for lineage (world tasks have none)."""
    names = [params.prompts_dataset, params.validation_dataset]
    return [read_dataset(name) for name in names if name]


def _at(ref: DatasetRef | ModelRef) -> str:
    return f"{ref.name}@{ref.version}"


def _stop(run, figures: dict, status: str, queue: DatasetRef, text: str) -> dict:
    """End a human-path run that has no labels to train on (yet)."""
    run.summary(figures | {"status": text})
    return {"status": status, "queue": _at(queue)}


RELABEL = Deployment("reward/relabel", "UGDA relabeling", RelabelParams)


@RELABEL.flow(check=check_inputs)
def relabel(params: RelabelParams, ensemble: ModelRef, run: FlowRun) -> dict:
    """UGDA: relabel the policy samples the ensemble is unsure about and that matter for
    the validation set, then refine the ensemble on them."""
    names = ["candidates", "labeled", "failed", "model"]
    planned = _workdir(params, ensemble).put_once("versions", {k: new_version() for k in names})
    figures: dict = {"ensemble": _at(ensemble), "arm": params.arm}
    book = (
        QueueBook(data_root() / "_work" / "relabel-queues") if params.labeler == "human" else None
    )
    queue = book.pending(params.queue) if book else None
    if book and queue is not None:
        # the human path, second half: labels for the queue written by an earlier run
        path = params.labels_path()
        if not path.exists():
            text = f"waiting for labels of {_at(queue)} at {path}"
            return _stop(run, figures, "waiting", queue, text)
        labeled, validation, read = book.labels(path, queue)
        figures, failures, inputs = figures | read, [], [queue]
    else:
        sampled = sample_policy(params, ensemble)
        validation = sampled.validation
        rows = score_and_select(params, ensemble, sampled)
        lineage = [ensemble, *model_inputs(params.policy), *_prompt_inputs(params)]
        dataset, version = params.candidates_dataset, planned["candidates"]
        candidates, _ = write_once(dataset, rows, version, run.id, lineage, CANDIDATE_SCHEMA)
        selected = [r for r in rows if r["selected"]]
        figures |= relabeling.selection_figures(rows, sampled.report)
        figures["dataset: candidates"] = _at(candidates)
        if book:
            queued = book.enqueue(
                selected, params.queue, validation, produced_by=run.id, inputs=[candidates]
            )
            text = (
                f"queued {len(selected)} pairs as {_at(queued)}; label them "
                f"(columns id, label = a or b) into {params.labels_path()} and run again"
            )
            return _stop(run, figures, "queued", queued, text)
        labeled, failures = label(params, selected)
        inputs = [candidates]
    tables = relabeling.label_tables(params.labeled_dataset, labeled, failures)
    written = {
        k: write_once(name, rows, planned[k], run.id, inputs, schema)[0]
        for k, name, rows, schema in tables
    }
    figures |= relabeling.label_figures(labeled, failures, written)
    if not labeled:
        run.summary(figures)
        return {"status": "no labels", "figures": figures}
    refined = refine_ensemble(
        ensemble,
        labeled,
        validation,
        params.ugda(),
        inputs=[written["labeled"]],
        prompt_inputs=_prompt_inputs(params),
        version=planned["model"],
        produced_by=run.id,
    )
    if book and queue is not None:
        book.consumed(queue.version)
    figures |= relabeling.refine_figures(ensemble, refined, validation)
    # refinement reads pairs as the ensemble was trained to (its max_length)
    figures |= length_figures(refined.meta["metrics"].get("length", {}))
    run.summary(figures)
    return {"status": "refined", "model": refined.model_dump(), "figures": figures}
