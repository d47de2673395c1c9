"""What a REFED run writes: its three datasets' fixed schemas (synthesized samples,
per-reference feedback, failures with their raw text), the feedback rows, and the run
summary's figures from `RefedRun.result`'s stats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

# Fixed schemas: a run that synthesizes nothing (every reference failed, the judge
# dropped everything) still writes its (empty) datasets and, above all, its failures.
FAILED_SCHEMA = pa.schema(
    [
        *((c, pa.string()) for c in ("stage", "item_id", "reference_id", "raw", "error")),
        ("attempts", pa.int64()),
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("reference_id", pa.string()),
        *((c, pa.list_(pa.string())) for c in ("subject_areas", "skills")),
        *((c, pa.string()) for c in ("content_quality", "communication", "instruction_alignment")),
    ]
)
# text columns, but for whether refinement changed the response and the judge's score
SAMPLES_SCHEMA = pa.schema(
    [
        *((c, pa.string()) for c in ("id", "reference_id", "reference_instruction", "feature")),
        *((c, pa.string()) for c in ("family", "instruction", "response", "initial_response")),
        ("refined", pa.bool_()),
        ("judge_score", pa.float64()),
    ]
)


def feedback_rows(feedback: Sequence[dict]) -> list[dict]:
    """The feedback dataset's rows: each reference's feedback without its request count;
    a reference whose feedback failed is left out (its failures are in the failed set)."""
    return [
        {k: v for k, v in fb.items() if k != "requests"} for fb in feedback if "failures" not in fb
    ]


# the run summary's label of each of `RefedRun.result`'s stats, in the order shown
SUMMARY_LABELS = {
    "rows": "rows written",
    "failed": "failures",
    "references": "references",
    "feedback_requests_per_sample": "feedback requests per synthesized sample",
    "samples_per_reference": "samples per reference",
    "refined_changed": "responses changed by refinement",
    "dropped_by_diversity": "dropped by diversity filter",
    "dropped_by_judge": "dropped by judge",
}


def summary_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """`RefedRun.result`'s stats as a run summary shows them."""
    return {label: stats[key] for key, label in SUMMARY_LABELS.items()}


__all__ = [
    "FAILED_SCHEMA",
    "FEEDBACK_SCHEMA",
    "SAMPLES_SCHEMA",
    "SUMMARY_LABELS",
    "feedback_rows",
    "summary_figures",
]
