"""One UGDA relabeling round on the store: the parts `reward/relabel` wires together.

- its inputs: a dataset of text prompts (`read_text_prompts`), labelled validation
  pairs (`read_pairs`), a registered ensemble (`check_ensemble`, `original_pairs`);
- sampling the policy (`sample_round`), scoring and selecting (`scored_rows`), refining
  (`refine_version`);
- the datasets it writes: the scored candidates with the selection flagged
  (`CANDIDATE_SCHEMA`), the labeled pairs and the labeler's failures (`label_tables`),
  and the figures of each step;
- the human path across runs (`QueueBook`): a queue written, its labels read, which
  queue versions were consumed, and the validation pairs each queue was selected with.

Nothing here knows a domain: the caller passes its prompts and its oracle in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa

from flywheel.llm.base import Backend
from flywheel.reward_models.ensemble import EnsembleRewardModel, pairwise_accuracy
from flywheel.reward_models.labelers import PAIR_FIELDS, Labeler, read_labels, write_queue
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
    failed_name,
    list_versions,
    read_dataset,
    read_model,
    save_model_version,
)

# a candidate is a policy pair (its PAIR_FIELDS, text) and the ensemble's view of it
CANDIDATE_SCHEMA = pa.schema(
    [
        *((c, pa.string()) for c in PAIR_FIELDS),
        ("p_mean", pa.float64()),
        ("variance", pa.float64()),
        ("influence", pa.float64()),
        ("selected", pa.bool_()),
    ]
)
FAILED_SCHEMA = pa.schema([(c, pa.string()) for c in (*PAIR_FIELDS, "raw", "error", "labeler")])
LABELED_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("id", "prompt", "chosen", "rejected", "label", "labeler")]
)


# --- inputs ---


def check_datasets(prompts_dataset: str | None, validation_dataset: str | None) -> None:
    """Before anything is sampled: the prompts dataset has a `prompt` column and comes
    with labelled validation pairs (an oracle labels only its own domain's prompts)."""
    if prompts_dataset:
        columns = read_dataset(prompts_dataset).meta["columns"]
        if "prompt" not in columns:
            raise ValueError(
                f"prompts_dataset: {prompts_dataset} has no `prompt` column "
                f"(columns: {sorted(columns)})"
            )
        if validation_dataset is None:
            raise ValueError(
                "validation_dataset: required with prompts_dataset (the world oracle can "
                "only label world tasks); give labelled prompt/chosen/rejected pairs"
            )
    if validation_dataset:
        read_dataset(validation_dataset)


def read_text_prompts(name: str) -> list[str]:
    """The `prompt` column of a dataset; every prompt must be non-empty text."""
    prompts = read_dataset(name).to_pandas()["prompt"].tolist()
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        # chat-message prompts too: UGDA's pairs are keyed and judged on prompt text
        raise ValueError(
            f"prompts_dataset: {name} has {len(bad)} prompt(s) that are "
            f"not non-empty text, first at row {bad[0]} ({type(prompts[bad[0]]).__name__}); "
            "reward/relabel takes text prompts (chat messages are not supported here yet)"
        )
    return prompts


def read_pairs(name: str) -> list[dict]:
    """A dataset of labelled pairs (prompt/chosen/rejected) as rows."""
    return read_dataset(name).to_pandas().to_dict("records")


def check_ensemble(ensemble: ModelRef) -> ModelRef:
    if ensemble.meta.get("kind") != "ensemble":
        raise ValueError(
            f"ensemble: {ensemble.name} is a {ensemble.meta.get('kind')!r} model; UGDA needs "
            "an ensemble (train one with reward/train kind='ensemble')"
        )
    return ensemble


def original_pairs(ensemble: ModelRef) -> tuple[list[dict], list[DatasetRef]]:
    """The pairs the ensemble was trained on (its first dataset input), for replay, and
    that dataset for the refined ensemble's lineage."""
    for i in ensemble.meta.get("inputs", []):
        if i.get("kind") == "dataset":
            ref = read_dataset(i["name"], i["version"])
            return ref.to_pandas().to_dict("records"), [ref]
    return [], []


# --- sampling, scoring, selection ---


def sample_round(
    policy: Backend,
    prompts: Sequence[str],
    sampling: dict,
    config: UgdaConfig,
    *,
    validation: list[dict] | None = None,
    validation_prompts: Sequence[str] = (),
    oracle: Labeler | None = None,
) -> dict:
    """Two policy responses per prompt (the candidates) and the validation pairs: the
    given ones, or `oracle`'s labels of policy pairs on `validation_prompts` (sampled
    with seed + 1). `sampling` holds policy_pairs' keywords."""
    candidates, report = policy_pairs(policy, prompts, **sampling)
    if validation is None:
        if oracle is None:
            raise ValueError("validation: give labelled pairs or an oracle to label policy pairs")
        pairs, _ = policy_pairs(
            policy, validation_prompts, **sampling | {"seed": sampling["seed"] + 1}
        )
        validation, _ = oracle.label(pairs)
    config.check_candidates(len(candidates))
    return {"candidates": candidates, "validation": validation, "report": report}


def scored_rows(
    ensemble_path: str | Path,
    candidates: Sequence[dict],
    validation: Sequence[dict],
    config: UgdaConfig,
) -> list[dict]:
    """The candidates with their mean preference, variance and influence, and whether
    `config.arm` selects them (rows of CANDIDATE_SCHEMA)."""
    scores = score_candidates(ensemble_path, candidates, validation, config)
    chosen = set(select(scores["variance"], scores["influence"], config))
    # influence exists only for the uncertain pool, and only for arm uncertainty+influence
    influence = scores["influence"] or [None] * len(candidates)
    return [
        {
            **pair,
            "p_mean": scores["p_mean"][i],
            "variance": scores["variance"][i],
            "influence": influence[i],
            "selected": i in chosen,
        }
        for i, pair in enumerate(candidates)
    ]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def selection_figures(rows: Sequence[dict], report: dict) -> dict:
    """How many pairs there were and were selected, and how uncertain each set is."""
    selected = [r for r in rows if r["selected"]]
    return {
        "policy pairs (candidates)": len(rows),
        "identical response pairs skipped": report["identical"],
        # reward training keeps empty text out, so labeling such a pair would waste budget
        "pairs with an empty response skipped": report.get("empty_response", 0),
        "repeated pairs skipped": report.get("repeated", 0),
        "selected for labeling": len(selected),
        "mean variance: selected / all": (
            f"{_mean(r['variance'] for r in selected):.4g} / "
            f"{_mean(r['variance'] for r in rows):.4g}"
        ),
    }


def _at(ref: DatasetRef | ModelRef) -> str:
    return f"{ref.name}@{ref.version}"


def label_tables(
    labeled_dataset: str, labeled: Sequence[dict], failures: Sequence[dict]
) -> list[tuple[str, str, list[dict], pa.Schema]]:
    """(key, dataset name, rows, schema) of the labeled pairs and of the labeler's
    failures (`<labeled_dataset>__failed`, every field as text)."""
    return [
        (
            "labeled",
            labeled_dataset,
            [{k: r[k] for k in LABELED_SCHEMA.names} for r in labeled],
            LABELED_SCHEMA,
        ),
        (
            "failed",
            failed_name(labeled_dataset),
            [{k: str(f[k]) for k in FAILED_SCHEMA.names} for f in failures],
            FAILED_SCHEMA,
        ),
    ]


def label_figures(labeled: Sequence[dict], failures: Sequence[dict], written: dict) -> dict:
    return {
        "labeled pairs": len(labeled),
        "labeler failures (ties, unparsed answers)": len(failures),
        "dataset: labeled": _at(written["labeled"]),
        "dataset: failed": _at(written["failed"]),
    }


def refine_version(
    ensemble: ModelRef,
    labeled: list[dict],
    validation: list[dict],
    config: UgdaConfig,
    *,
    inputs: Sequence[DatasetRef | ModelRef],
    prompt_inputs: Sequence[DatasetRef] = (),
    version: str,
    produced_by: str,
) -> ModelRef:
    """Continue training the ensemble on the relabeled pairs (plus a replay of its original
    pairs); a new version of the same model name. A planned version: a re-run reuses it.
    Lineage: the ensemble, `inputs` (the labeled pairs), the replayed dataset, and
    `prompt_inputs` (the datasets the candidates and validation pairs came from)."""
    try:
        return read_model(ensemble.name, version)
    except ModelNotRegistered:
        pass
    original, replayed = original_pairs(ensemble)

    def build(folder: Path) -> dict:
        return refine(ensemble.path, labeled, original, validation, config, folder)

    return save_model_version(
        ensemble.name,
        build,
        kind="ensemble",
        produced_by=produced_by,
        inputs=[ensemble, *inputs, *replayed, *prompt_inputs],
        version=version,
    )


def validation_accuracy(model: ModelRef, rows: list[dict]) -> float | None:
    if not rows:
        return None
    loaded = EnsembleRewardModel(model.path)
    return pairwise_accuracy(loaded.model, loaded.tok, rows)["mean"]


def refine_figures(ensemble: ModelRef, refined: ModelRef, validation: list[dict]) -> dict:
    """The refined version and the validation accuracy before and after."""
    return {
        "refined ensemble": _at(refined),
        "validation accuracy before": validation_accuracy(ensemble, validation),
        # refine() evaluates on the validation pairs it is given: read, do not recompute
        "validation accuracy after": refined.meta["metrics"]["eval_pairwise_accuracy"]["mean"],
    }


# --- the human path ---


class QueueBook:
    """People label through queues across runs: a run writes the selection as a queue
    version (`enqueue`), a later one reads the labels file (`labels`). The book keeps
    which queue versions a refined ensemble consumed, and each queue's validation pairs
    (the later run validates as the first would have)."""

    def __init__(self, folder: str | Path) -> None:
        self.ckpt = Checkpoint(folder)

    def pending(self, queue: str) -> DatasetRef | None:
        """The latest version of `queue` that no refined ensemble has consumed yet."""
        versions = list_versions(queue)
        if not versions:
            return None
        ref = read_dataset(queue, versions[-1])
        return None if self.ckpt.get(ref.version) else ref

    def enqueue(
        self,
        selected: Sequence[dict],
        queue: str,
        validation: list[dict],
        *,
        produced_by: str,
        inputs: Sequence[DatasetRef],
    ) -> DatasetRef:
        """Write the selected pairs as a new version of `queue` for people to label."""
        pairs = [{k: r[k] for k in PAIR_FIELDS} for r in selected]
        ref = write_queue(pairs, queue, produced_by=produced_by, inputs=inputs)
        self.ckpt.put(f"{ref.version}-validation", validation)
        return ref

    def labels(self, path: Path, queue: DatasetRef) -> tuple[list[dict], list[dict], dict]:
        """The labeled rows of a queue's labels file, the queue's validation pairs, and
        how many of its pairs were not used."""
        labeled, not_used = read_labels(path, queue)
        figures = {
            "labels file": str(path),
            "queue pairs left unlabeled": sum(p["reason"] == "unlabeled" for p in not_used),
            "queue pairs kept out (label not a or b)": sum(
                p["reason"] != "unlabeled" for p in not_used
            ),
        }
        return labeled, self.ckpt.get(f"{queue.version}-validation") or [], figures

    def consumed(self, version: str) -> None:
        self.ckpt.put(version, True)
