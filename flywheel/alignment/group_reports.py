"""What a group robust run reports, from the figures `train_group_robust` returns: the
group weights' history (saved beside the policy, shown as a table and a plot), the
held-out figures per method and group, and the length counts per group."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

from flywheel.alignment.group_robust import plot_history

HISTORY = "group_history.json"
PLOT = "group_weights.png"


def save_history(history: Sequence[dict], folder: Path, title: str) -> None:
    """The weights' and losses' history per step, as JSON and as a plot, into `folder`."""
    (folder / HISTORY).write_text(json.dumps(history))
    plot_history(history, folder / PLOT, title)


def history_markdown(folder: Path, rows: int = 10) -> str:
    """About `rows` steps of the saved history as a table, then the PNG inline (so a
    markdown artifact shows it without a file server)."""
    history = json.loads((folder / HISTORY).read_text())
    groups = sorted(history[0]["weights"]) if history else []
    lines = [
        "| step | " + " | ".join(f"q {g}" for g in groups) + " | worst group (batch loss) |",
        "|---" * (len(groups) + 2) + "|",
    ]
    for entry in history[:: max(1, len(history) // rows)] + history[-1:]:
        worst = max(entry["loss"], key=entry["loss"].get)
        weights = " | ".join(f"{entry['weights'][g]:.3f}" for g in groups)
        lines.append(f"| {entry['step']} | {weights} | {worst} ({entry['loss'][worst]:.3f}) |")
    encoded = base64.b64encode((folder / PLOT).read_bytes()).decode()
    return "\n".join(lines) + f"\n\n![group weights and losses](data:image/png;base64,{encoded})"


def evaluation_rows(metrics: dict, model: str) -> list[dict]:
    """One row per method and group of `model` (its name@version): held-out pairs,
    accuracy, loss, worst-group flag and final group weight. `metrics` is the robust
    run's figures, with the baseline's under `baseline` when one was trained."""
    rows = []
    for report in (metrics, metrics.get("baseline")):
        if report is None:
            continue
        held = report["held_out"]
        for group, figures in held["groups"].items():
            rows.append(
                {
                    "model": model,
                    "method": report["method"],
                    "group": group,
                    "pairs": figures["pairs"],
                    "accuracy": figures["accuracy"],
                    "loss": figures["loss"],
                    "worst_group": group == held["worst_group"],
                    "final_group_weight": (report["final_group_weights"] or {}).get(group),
                }
            )
    return rows


def evaluation_markdown(rows: Sequence[dict]) -> str:
    """`evaluation_rows` as a markdown table."""
    lines = [
        "| method | group | pairs | accuracy | loss | weight |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        weight = "" if row["final_group_weight"] is None else f"{row['final_group_weight']:.3f}"
        lines.append(
            f"| {row['method']} | {row['group']} | {row['pairs']} | {row['accuracy']:.3f} "
            f"| {row['loss']:.3f} | {weight} |"
        )
    return "\n".join(lines)


def length_by_split(length: dict) -> dict[str, dict]:
    """The length counts per split (`train`, `eval`), then per split and group
    (`train group <g>`)."""
    per_split: dict[str, dict] = {}
    for split, report in length.items():
        per_split[split] = report["all"]
        for group, figures in report.get("by_group", {}).items():
            per_split[f"{split} group {group}"] = figures
    return per_split
