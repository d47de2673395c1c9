"""Who says which of two responses is better: an LLM judge, people, or a domain's own
oracle (the world's, `WorldOracleLabeler`, lives with the world in `world/labelers.py`).

Every labeler takes unlabeled pairs `{id, prompt, response_a, response_b}` and
returns `(labeled_rows, failures)`:

- a labeled row is a preference row `{id, prompt, chosen, rejected, label, labeler}`
  (`label` is "a" or "b": which response won), ready for reward-model training;
- a failure keeps the pair with the raw text and the error (a judge answer that
  did not parse, an oracle tie), so nothing is dropped silently; write them to a
  `<name>__failed` dataset.

A labeler is any subclass of `Labeler`; `check_pairs`, `preference_row`,
`failure_row` and `log_outcome` give every labeler the same row formats and report.

People label through a queue: `write_queue` stores the pairs as a dataset with an
empty `label` column that any tool can open (DuckDB, a spreadsheet via CSV,
pandas); `read_labels` checks the labeled file against that queue version.
"""

from __future__ import annotations

import logging
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from flywheel.llm.base import Backend
from flywheel.store import DatasetRef, write_dataset

log = logging.getLogger(__name__)

PAIR_FIELDS = ("id", "prompt", "response_a", "response_b")
LABELS = ("a", "b")


class Labeler(ABC):
    """Labels unlabeled pairs; see the module docstring for the row formats."""

    name: str

    @abstractmethod
    def label(self, pairs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
        """(labeled preference rows, failure rows); every pair ends up in exactly one."""


def check_pairs(pairs: Sequence[dict], source: str = "pairs") -> None:
    """Raise ValueError naming the problem when pairs lack a field or repeat an id."""
    for i, pair in enumerate(pairs):
        missing = [f for f in PAIR_FIELDS if f not in pair]
        if missing:
            raise ValueError(
                f"{source}: row {i} lacks field(s) {missing} (has {sorted(pair)}); "
                f"unlabeled pairs need {list(PAIR_FIELDS)}"
            )
    ids = [p["id"] for p in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{source}: id {dup!r} appears more than once; pair ids must be unique")


def preference_row(pair: dict, winner: str, labeler: str) -> dict:
    """The pair as a (prompt, chosen, rejected) row; `winner` is "a" or "b"."""
    a, b = pair["response_a"], pair["response_b"]
    chosen, rejected = (a, b) if winner == "a" else (b, a)
    return {
        "id": pair["id"],
        "prompt": pair["prompt"],
        "chosen": chosen,
        "rejected": rejected,
        "label": winner,
        "labeler": labeler,
    }


def failure_row(pair: dict, raw: str, error: str, labeler: str) -> dict:
    return {
        "id": pair["id"],
        "prompt": pair["prompt"],
        "response_a": pair["response_a"],
        "response_b": pair["response_b"],
        "raw": raw,
        "error": error,
        "labeler": labeler,
    }


def log_outcome(name: str, labeled: list[dict], failures: list[dict]) -> None:
    """Log, by reason, the pairs a labeler could not label."""
    if failures:
        reasons: dict[str, int] = {}
        for f in failures:
            key = f["error"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        log.warning("%s: %d labeled, %d not labeled %s", name, len(labeled), len(failures), reasons)


# --- an LLM judge ---

JUDGE_TEMPLATE = (
    "Which response answers the request better? Reply with one letter, A or B.\n"
    "Request: {prompt}\n"
    "Response A: {first}\n"
    "Response B: {second}\n"
    "Better response:"
)
# The answer must start with the letter, optionally after "Response", "Answer:" or
# "(": a judge that writes "A" or "(B) because..." parses; "abc" or "both" does not.
_CHOICE = re.compile(
    r"^\W*(?:(?:response|answer|option)\s*[:=]?\s*)?\(?([ab])\)?(?![a-z0-9])", re.IGNORECASE
)


def parse_choice(text: str) -> str | None:
    """ "A" or "B" when the judge's answer states one, else None."""
    match = _CHOICE.match(text.strip())
    return match.group(1).upper() if match else None


class LLMJudgeLabeler(Labeler):
    """Asks any backend "which response is better, A or B" (greedy, one short answer).

    Each pair is shown in a random order (fixed per `seed` and pair id), so a
    judge that favours the first position does not favour response_a; the answer
    is mapped back. Answers that do not parse are failure rows with the raw text.
    Backend errors (an outage) propagate: they are not the pair's fault.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        seed: int = 0,
        max_new_tokens: int = 8,
        template: str = JUDGE_TEMPLATE,
    ) -> None:
        self.backend = backend
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.template = template
        self.name = f"judge:{backend.model}"

    def swapped(self, pair_id: str) -> bool:
        """Whether the pair is shown as (response_b, response_a)."""
        return random.Random(f"{self.seed}:{pair_id}").random() < 0.5

    def label(self, pairs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
        check_pairs(pairs)
        prompts = []
        for pair in pairs:
            first, second = pair["response_a"], pair["response_b"]
            if self.swapped(pair["id"]):
                first, second = second, first
            prompts.append(self.template.format(prompt=pair["prompt"], first=first, second=second))
        answers = self.backend.generate(prompts, max_new_tokens=self.max_new_tokens, stop=["\n"])
        labeled: list[dict] = []
        failures: list[dict] = []
        for pair, raw in zip(pairs, answers, strict=True):
            choice = parse_choice(raw)
            if choice is None:
                error = "the judge returned no text" if not raw.strip() else "no A/B choice"
                failures.append(failure_row(pair, raw, f"unparsed: {error}", self.name))
                continue
            first_won = choice == "A"
            # map the shown position back to the pair's own response
            winner = ("b" if first_won else "a") if self.swapped(pair["id"]) else choice.lower()
            labeled.append(preference_row(pair, winner, self.name))
        log_outcome(self.name, labeled, failures)
        return labeled, failures


# --- people, through a queue ---

LABEL_HELP = (
    "Fill the `label` column with `a` (response_a is better) or `b` (response_b is "
    "better); leave it empty to skip a pair. Keep the `id` column (and `queue_version`, "
    "so the answers are matched to this queue). Save as CSV, JSONL or parquet with at "
    "least the columns id and label, and load it with "
    "flywheel.reward_models.labelers.read_labels(path, queue)."
)


class LabelFileError(ValueError):
    """A labeled file that cannot be used; the message names the problem and the fix."""


def write_queue(
    pairs: Sequence[dict],
    name: str,
    *,
    produced_by: str | None = "reward/relabel:human-queue",
    inputs: Sequence[DatasetRef] = (),
    root: Path | None = None,
) -> DatasetRef:
    """Write pairs for people to label: id, prompt, response_a, response_b, an empty
    `label` column and `queue_version`. The labeling instructions ride in the parquet
    schema (metadata `labeling` and the `label` column's `description`)."""
    from flywheel.store.naming import new_version

    check_pairs(pairs, f"queue {name}")
    version = new_version()
    schema = pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("prompt", pa.string()),
            pa.field("response_a", pa.string()),
            pa.field("response_b", pa.string()),
            pa.field("label", pa.string(), metadata={"description": LABEL_HELP}),
            pa.field("queue_version", pa.string()),
        ],
        metadata={"labeling": LABEL_HELP},
    )
    rows = [
        {**{f: str(p[f]) for f in PAIR_FIELDS}, "label": None, "queue_version": version}
        for p in pairs
    ]
    ref = write_dataset(
        name,
        rows,
        produced_by=produced_by,
        inputs=inputs,
        version=version,
        root=root,
        schema=schema,
    )
    log.info("labeling queue %s/%s: %d pairs. %s", name, version, len(rows), LABEL_HELP)
    return ref


def _read_table(path: Path):
    import pandas as pd

    suffix = "".join(path.suffixes[-1:]).lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as e:  # the reader's own message says what is wrong with the file
        raise LabelFileError(f"{path}: could not be read as {suffix[1:]} ({e})") from e
    raise LabelFileError(
        f"{path}: unsupported file type {suffix or '(none)'}; save the labels as .csv, "
        ".jsonl or .parquet"
    )


def _text(value: object) -> str:
    """A cell as text; empty for missing values (None, NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def read_labels(path: str | Path, queue: DatasetRef) -> tuple[list[dict], list[dict]]:
    """Check a labeled file against its queue; return (labeled rows, queue pairs not used).

    Rejected with LabelFileError (nothing is used), since the file does not answer this
    queue: missing `id`/`label` columns, a `queue_version` other than the queue's, ids
    not in the queue, duplicate ids. Kept out of training and reported by count and
    example: labels other than a/b (case-insensitive; `reason` "label 'x' is not a or
    b") and empty labels (partial labeling; `reason` "unlabeled"). Both come back in
    the second list, each pair with its `reason`.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"{path}: no such file")
    frame = _read_table(path)
    missing = [c for c in ("id", "label") if c not in frame.columns]
    if missing:
        raise LabelFileError(
            f"{path}: column(s) {missing} missing (columns present: {list(frame.columns)}); "
            "a labeled file needs the queue's `id` column and a `label` column (a or b)"
        )
    where = f"queue {queue.name}/{queue.version}"
    if "queue_version" in frame.columns:
        versions = sorted({_text(v) for v in frame["queue_version"]} - {""})
        other = [v for v in versions if v != queue.version]
        if other:
            raise LabelFileError(
                f"{path}: answers queue version(s) {other}, not {queue.version}; load it "
                f"against that version (read_dataset({queue.name!r}, {other[0]!r})) or "
                f"label the pairs of {where}"
            )
    pairs = {r["id"]: r for r in queue.to_arrow().to_pylist()}
    ids = [_text(v) for v in frame["id"]]
    unknown = [i for i in ids if i not in pairs]
    if unknown:
        raise LabelFileError(
            f"{path}: {len(unknown)} id(s) are not in {where}, e.g. {unknown[0]!r}; "
            "keep the `id` column as written in the queue (a spreadsheet may have "
            "changed it) and label only that queue's pairs"
        )
    seen: set[str] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})
    if dups:
        raise LabelFileError(
            f"{path}: {len(dups)} id(s) appear more than once, e.g. {dups[0]!r}; "
            "give each pair one row (one label)"
        )
    labels = [_text(v).lower() for v in frame["label"]]
    bad = {i: lab for i, lab in zip(ids, labels, strict=True) if lab and lab not in LABELS}
    if bad:
        first = next(iter(bad))
        log.warning(
            "%s: %d label(s) are not a or b and are kept out of training, e.g. id %r has %r; "
            "write a (response_a better) or b (response_b better), or leave the cell empty",
            path,
            len(bad),
            first,
            bad[first],
        )
    labeler = f"human:{path.name}"
    answered = {i: lab for i, lab in zip(ids, labels, strict=True) if lab in LABELS}
    rows = [preference_row(pairs[i], lab, labeler) for i, lab in answered.items()]
    not_used = [
        {**p, "reason": f"label {bad[i]!r} is not a or b" if i in bad else "unlabeled"}
        for i, p in pairs.items()
        if i not in answered
    ]
    unlabeled = [p for p in not_used if p["reason"] == "unlabeled"]
    if unlabeled:
        log.warning(
            "%s: %d of %d pairs of %s unlabeled (partial labeling), e.g. %r",
            path,
            len(unlabeled),
            len(pairs),
            where,
            unlabeled[0]["id"],
        )
    return rows, not_used
