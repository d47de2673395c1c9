"""`reward/relabel`: one UGDA round on a registered reward ensemble. Wiring only; the
method is `flywheel.reward_models.ugda`, the labelers `flywheel.reward_models.labelers`
(the world's oracle: `flywheel.world.labelers`).

With `labeler: human` a run writes the selected pairs as a queue dataset and stops; the
next run finds the labeled file, checks it against the queue and refines the ensemble.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import pyarrow as pa
from prefect import flow, task
from pydantic import ConfigDict, Field, field_validator

from flywheel.flows.reward import RewardTrainParams, default_backbone, train_flow
from flywheel.flows.tracking import (
    MODEL_CALLS,
    length_figures,
    model_inputs,
    recorded_run,
    write_once,
)
from flywheel.llm import BackendSpec, make_backend, model_fingerprint
from flywheel.reward_models.ensemble import EnsembleRewardModel, pairwise_accuracy
from flywheel.reward_models.labelers import LLMJudgeLabeler, read_labels, write_queue
from flywheel.reward_models.ugda import (
    UgdaConfig,
    policy_pairs,
    refine,
    score_candidates,
    select,
)
from flywheel.store import (
    Checkpoint,
    DatasetRef,
    ModelNotRegistered,
    ModelRef,
    data_root,
    failed_name,
    list_versions,
    read_dataset,
    read_model,
    save_model_version,
    validate_name,
)
from flywheel.store.datasets import new_version, validate_output_name
from flywheel.store.models import validate_model_name
from flywheel.world.labelers import WorldOracleLabeler
from flywheel.world.tasks import MAX_LEN, sample_tasks

DEFAULT_ENSEMBLE = "world-preference-pairs-ensemble3"
CANDIDATE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("response_a", pa.string()),
        ("response_b", pa.string()),
        ("p_mean", pa.float64()),
        ("variance", pa.float64()),
        ("influence", pa.float64()),
        ("selected", pa.bool_()),
    ]
)
FAILED_SCHEMA = pa.schema(
    [
        (c, pa.string())
        for c in ("id", "prompt", "response_a", "response_b", "raw", "error", "labeler")
    ]
)
LABELED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("label", pa.string()),
        ("labeler", pa.string()),
    ]
)


def _policy_spec() -> BackendSpec:
    return BackendSpec(model=default_backbone())


WORLD_RESPONSE_TOKENS = MAX_LEN + 2  # a world answer and its end
TEXT_RESPONSE_TOKENS = 256


class RelabelParams(UgdaConfig):
    """Parameters of `reward/relabel`: UGDA's knobs, the policy, the labeler."""

    model_config = ConfigDict(extra="forbid")

    ensemble: str = Field(
        DEFAULT_ENSEMBLE,
        description="registered reward ensemble; the default is trained first when missing",
    )
    policy: BackendSpec = Field(default_factory=_policy_spec, description="the current policy")
    prompts_dataset: str | None = Field(
        None, description="store dataset with a `prompt` column; null: world tasks"
    )
    n_prompts: int = Field(600, ge=2, description="world prompts to sample (2 responses each)")
    validation_dataset: str | None = Field(
        None,
        description="labelled prompt/chosen/rejected pairs on the policy's distribution; "
        "null: world oracle labels of a separate set of policy pairs",
    )
    n_validation_prompts: int = Field(200, ge=2)
    temperature: float = Field(1.0, gt=0, description="policy sampling temperature")
    policy_max_new_tokens: int | None = Field(
        None,
        ge=1,
        description=f"tokens per policy response; null: {WORLD_RESPONSE_TOKENS} for world "
        f"tasks, {TEXT_RESPONSE_TOKENS} for prompts_dataset",
    )
    policy_stop: list[str] | None = Field(
        None,
        description="stop strings of policy responses; null: a newline for world tasks, "
        "none for prompts_dataset",
    )
    judge_max_new_tokens: int = Field(
        16, ge=1, description="tokens of the judge's answer (labeler 'llm'; it names A or B)"
    )
    labeler: Literal["world", "llm", "human"] = "world"
    judge: BackendSpec | None = Field(None, description="the LLM judge (labeler 'llm')")
    queue: str = Field("relabel_queue", description="dataset people label (labeler 'human')")
    candidates_dataset: str = Field(
        "relabel_candidates", description="output: the scored policy pairs, selected flagged"
    )
    labeled_dataset: str = Field(
        "relabel_labeled", description="output: the labeled pairs (and <name>__failed)"
    )
    labels_file: str | None = Field(
        None,
        description="the labeled file for the latest queue (csv, jsonl or parquet); null: "
        "data/_labels/<queue>.csv",
    )
    budget: int = Field(64, ge=1, description="pairs sent to the labeler")

    @field_validator("prompts_dataset", "validation_dataset", "queue")
    @classmethod
    def _dataset_name(cls, name: str | None) -> str | None:
        return None if name is None else validate_name(name)

    @field_validator("candidates_dataset")
    @classmethod
    def _candidates_name(cls, name: str) -> str:
        return validate_output_name(name, field="candidates_dataset")

    @field_validator("labeled_dataset")
    @classmethod
    def _labeled_name(cls, name: str) -> str:
        return validate_output_name(name, field="labeled_dataset", failed=True)

    @field_validator("ensemble")
    @classmethod
    def _ensemble_name(cls, name: str) -> str:
        # refined versions are saved under this name
        return validate_model_name(name, field="ensemble")

    def ugda(self) -> UgdaConfig:
        return UgdaConfig.model_validate(self.model_dump(include=set(UgdaConfig.model_fields)))

    def labels_path(self) -> Path:
        if self.labels_file:
            return Path(self.labels_file).expanduser()
        return data_root() / "_labels" / f"{self.queue}.csv"


@task(name="check-inputs")
def check_inputs(params: RelabelParams) -> ModelRef:
    """Fail before sampling: the ensemble, the policy, the labeler's settings, the data."""
    params.policy.check()
    if params.labeler == "llm":
        if params.judge is None:
            raise ValueError("judge: required when labeler is 'llm' (a BackendSpec)")
        params.judge.check()
    if params.prompts_dataset:
        columns = read_dataset(params.prompts_dataset).meta["columns"]
        if "prompt" not in columns:
            raise ValueError(
                f"prompts_dataset: {params.prompts_dataset} has no `prompt` column "
                f"(columns: {sorted(columns)})"
            )
        if params.validation_dataset is None:
            raise ValueError(
                "validation_dataset: required with prompts_dataset (the world oracle can "
                "only label world tasks); give labelled prompt/chosen/rejected pairs"
            )
    if params.validation_dataset:
        read_dataset(params.validation_dataset)
    try:
        ensemble = read_model(params.ensemble)
    except ModelNotRegistered:
        if params.ensemble != DEFAULT_ENSEMBLE:
            raise
        # the nightly default bootstraps itself from the world's pairs
        train_flow(RewardTrainParams(kind="ensemble", members=3, seed=params.seed))
        ensemble = read_model(params.ensemble)
    if ensemble.meta.get("kind") != "ensemble":
        raise ValueError(
            f"ensemble: {params.ensemble} is a {ensemble.meta.get('kind')!r} model; UGDA needs "
            "an ensemble (train one with reward/train kind='ensemble')"
        )
    return ensemble


def _workdir(params: RelabelParams, ensemble: ModelRef) -> Checkpoint:
    key = Checkpoint.key(
        params.model_dump(mode="json", exclude={"labels_file"}),
        f"{ensemble.name}@{ensemble.version}",
        model_fingerprint(params.policy),
    )
    return Checkpoint(data_root() / "_work" / "relabel" / key)


def _prompts(params: RelabelParams) -> tuple[list[str], list[str]]:
    """(candidate prompts, validation prompts): disjoint world tasks, or the dataset's."""
    if params.prompts_dataset:
        prompts = read_dataset(params.prompts_dataset).to_pandas()["prompt"].tolist()
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if bad:
            # chat-message prompts too: UGDA's pairs are keyed and judged on prompt text
            raise ValueError(
                f"prompts_dataset: {params.prompts_dataset} has {len(bad)} prompt(s) that are "
                f"not non-empty text, first at row {bad[0]} ({type(prompts[bad[0]]).__name__}); "
                "reward/relabel takes text prompts (chat messages are not supported here yet)"
            )
        return prompts, []
    rng = random.Random(f"relabel-{params.seed}")
    tasks = sample_tasks(params.n_prompts + params.n_validation_prompts, rng)
    prompts = [t.prompt for t in tasks]
    return prompts[: params.n_prompts], prompts[params.n_prompts :]


@task(name="sample-policy", **MODEL_CALLS)
def sample_policy(params: RelabelParams, ensemble: ModelRef) -> dict:
    """Two responses per prompt from the current policy; oracle-labelled validation pairs.
    Kept in the run's checkpoint, so a re-run samples nothing again."""
    ckpt = _workdir(params, ensemble)
    if cached := ckpt.get("policy"):
        return cached
    prompts, validation_prompts = _prompts(params)
    with make_backend(params.policy) as policy:
        candidates, report = policy_pairs(policy, prompts, **_sampling(params))
        if params.validation_dataset:
            validation = read_dataset(params.validation_dataset).to_pandas().to_dict("records")
        else:
            sampling = _sampling(params) | {"seed": params.seed + 1}
            pairs, _ = policy_pairs(policy, validation_prompts, **sampling)
            validation, _ = WorldOracleLabeler().label(pairs)
    params.ugda().check_candidates(len(candidates))
    out = {"candidates": candidates, "validation": validation, "report": report}
    ckpt.put("policy", out)
    return out


def _sampling(params: RelabelParams) -> dict:
    """How the policy samples: world tasks have one-line answers of a few tokens; the
    user's prompts get room for text."""
    world = params.prompts_dataset is None
    tokens = params.policy_max_new_tokens
    stop = params.policy_stop
    return {
        "temperature": params.temperature,
        "seed": params.seed,
        "max_new_tokens": tokens or (WORLD_RESPONSE_TOKENS if world else TEXT_RESPONSE_TOKENS),
        "stop": stop if stop is not None else (["\n"] if world else []),
    }


@task(name="score-and-select")
def score_and_select(params: RelabelParams, ensemble: ModelRef, sampled: dict) -> dict:
    ckpt = _workdir(params, ensemble)
    if cached := ckpt.get("selection"):
        return cached
    config = params.ugda()
    scores = score_candidates(ensemble.path, sampled["candidates"], sampled["validation"], config)
    chosen = set(select(scores["variance"], scores["influence"], config))
    # influence exists only for the uncertain pool, and only for arm uncertainty+influence
    influence = scores["influence"] or [None] * len(sampled["candidates"])
    rows = [
        {
            **pair,
            "p_mean": scores["p_mean"][i],
            "variance": scores["variance"][i],
            "influence": influence[i],
            "selected": i in chosen,
        }
        for i, pair in enumerate(sampled["candidates"])
    ]
    ckpt.put("selection", rows)
    return rows


@task(name="label", **MODEL_CALLS)
def label(params: RelabelParams, selected: list[dict]) -> tuple[list[dict], list[dict]]:
    if params.labeler == "world":
        return WorldOracleLabeler().label(selected)
    assert params.judge is not None  # checked in check-inputs
    with make_backend(params.judge) as judge:
        labeler = LLMJudgeLabeler(
            judge, seed=params.seed, max_new_tokens=params.judge_max_new_tokens
        )
        return labeler.label(selected)


def _original_rows(ensemble: ModelRef) -> tuple[list[dict], list[DatasetRef]]:
    """The pairs the ensemble was trained on (its first dataset input), for replay, and
    that dataset for the refined ensemble's lineage."""
    for i in ensemble.meta.get("inputs", []):
        if i.get("kind") == "dataset":
            ref = read_dataset(i["name"], i["version"])
            return ref.to_pandas().to_dict("records"), [ref]
    return [], []


def _prompt_inputs(params: RelabelParams) -> list[DatasetRef]:
    """The user's prompts and validation datasets, for lineage (world tasks have none)."""
    names = [params.prompts_dataset, params.validation_dataset]
    return [read_dataset(name) for name in names if name]


@task(name="refine-ensemble")
def refine_ensemble(
    params: RelabelParams,
    ensemble: ModelRef,
    labeled: list[dict],
    validation: list[dict],
    inputs: list,
    version: str,
    run_id: str,
) -> ModelRef:
    """Continue training the ensemble on the relabeled pairs (plus a replay of its original
    pairs); a new version of the same model name. A planned version: a re-run reuses it."""
    try:
        return read_model(ensemble.name, version)
    except ModelNotRegistered:
        pass
    config = params.ugda()
    original, replayed = _original_rows(ensemble)

    def build(folder: Path) -> dict:
        return refine(ensemble.path, labeled, original, validation, config, folder)

    return save_model_version(
        ensemble.name,
        build,
        kind="ensemble",
        produced_by=run_id,
        inputs=[ensemble, *inputs, *replayed, *_prompt_inputs(params)],
        version=version,
    )


def _accuracy(model: ModelRef, rows: list[dict]) -> float | None:
    if not rows:
        return None
    loaded = EnsembleRewardModel(model.path)
    return pairwise_accuracy(loaded.model, loaded.tok, rows)["mean"]


def _queues() -> Checkpoint:
    """Which queue versions were consumed, and each queue's validation pairs."""
    return Checkpoint(data_root() / "_work" / "relabel-queues")


def _pending_queue(params: RelabelParams) -> DatasetRef | None:
    """The latest queue version that no refined ensemble has consumed yet."""
    versions = list_versions(params.queue)
    if not versions:
        return None
    queue = read_dataset(params.queue, versions[-1])
    consumed = _queues().get(queue.version)
    return None if consumed else queue


# defaults in the signature: the UI shows and pre-fills them
RELABEL_DEFAULTS = RelabelParams()


@flow(name="reward")
def relabel(params: RelabelParams = RELABEL_DEFAULTS) -> dict:
    """UGDA: relabel the policy samples the ensemble is unsure about and that matter for
    the validation set, then refine the ensemble on them."""
    with recorded_run("reward/relabel", "UGDA relabeling", params) as run:
        ensemble = check_inputs(params)
        ckpt = _workdir(params, ensemble)
        names = ["candidates", "labeled", "failed", "model"]
        planned = ckpt.put_once("versions", {k: new_version() for k in names})
        figures: dict = {"ensemble": f"{ensemble.name}@{ensemble.version}", "arm": params.arm}
        queue = _pending_queue(params) if params.labeler == "human" else None
        if queue is not None:
            # the human path, second half: labels for the queue written by an earlier run
            path = params.labels_path()
            if not path.exists():
                figures["status"] = f"waiting for labels of {queue.name}@{queue.version} at {path}"
                run.summary(figures)
                return {"status": "waiting", "queue": f"{queue.name}@{queue.version}"}
            labeled, not_used = read_labels(path, queue)
            failures: list[dict] = []
            inputs: list = [queue]
            validation = _queues().get(f"{queue.version}-validation") or []
            figures["labels file"] = str(path)
            figures["queue pairs left unlabeled"] = sum(
                p["reason"] == "unlabeled" for p in not_used
            )
            figures["queue pairs kept out (label not a or b)"] = sum(
                p["reason"] != "unlabeled" for p in not_used
            )
        else:
            sampled = sample_policy(params, ensemble)
            validation = sampled["validation"]
            rows = score_and_select(params, ensemble, sampled)
            candidates, _ = write_once(
                params.candidates_dataset,
                rows,
                planned["candidates"],
                run.id,
                [ensemble, *model_inputs(params.policy), *_prompt_inputs(params)],
                CANDIDATE_SCHEMA,
            )
            selected = [r for r in rows if r["selected"]]
            figures |= {
                "policy pairs (candidates)": len(rows),
                "identical response pairs skipped": sampled["report"]["identical"],
                "selected for labeling": len(selected),
                "mean variance: selected / all": (
                    f"{_mean(r['variance'] for r in selected):.4g} / "
                    f"{_mean(r['variance'] for r in rows):.4g}"
                ),
                "dataset: candidates": f"{candidates.name}@{candidates.version}",
            }
            if params.labeler == "human":
                pairs = [
                    {k: r[k] for k in ("id", "prompt", "response_a", "response_b")}
                    for r in selected
                ]
                queued = write_queue(pairs, params.queue, produced_by=run.id, inputs=[candidates])
                figures["status"] = (
                    f"queued {len(pairs)} pairs as {queued.name}@{queued.version}; label them "
                    f"(columns id, label = a or b) into {params.labels_path()} and run again"
                )
                _queues().put(f"{queued.version}-validation", validation)
                run.summary(figures)
                return {"status": "queued", "queue": f"{queued.name}@{queued.version}"}
            labeled, failures = label(params, selected)
            inputs = [candidates]
        labeled_ref, _ = write_once(
            params.labeled_dataset,
            [{k: r[k] for k in LABELED_SCHEMA.names} for r in labeled],
            planned["labeled"],
            run.id,
            inputs,
            LABELED_SCHEMA,
        )
        failed_ref, _ = write_once(
            failed_name(params.labeled_dataset),
            [{k: str(f[k]) for k in FAILED_SCHEMA.names} for f in failures],
            planned["failed"],
            run.id,
            inputs,
            FAILED_SCHEMA,
        )
        figures |= {
            "labeled pairs": len(labeled),
            "labeler failures (ties, unparsed answers)": len(failures),
            "dataset: labeled": f"{labeled_ref.name}@{labeled_ref.version}",
            "dataset: failed": f"{failed_ref.name}@{failed_ref.version}",
        }
        out: dict = {"status": "no labels", "figures": figures}
        if labeled:
            refined = refine_ensemble(
                params, ensemble, labeled, validation, [labeled_ref], planned["model"], run.id
            )
            if queue is not None:
                _queues().put(queue.version, True)
            figures["refined ensemble"] = f"{refined.name}@{refined.version}"
            figures["validation accuracy before"] = _accuracy(ensemble, validation)
            # refine() evaluates on the validation pairs it is given: read, do not recompute
            after = refined.meta["metrics"]["eval_pairwise_accuracy"]["mean"]
            figures["validation accuracy after"] = after
            # refinement reads pairs as the ensemble was trained to (its max_length)
            figures |= length_figures(refined.meta["metrics"].get("length", {}))
            out = {"status": "refined", "model": refined.model_dump(), "figures": figures}
        run.summary(figures)
        return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
