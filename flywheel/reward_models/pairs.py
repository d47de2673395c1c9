"""Preference pairs as data, for every method trained on them: a seeded hold-out of
distinct pairs, and the copies of training pairs an eval set holds.

A pair is its prompt, chosen and rejected texts (`pair_key`): copies of one pair are one
comparison, so they all go to the same side of a split, and a group column
(align/group-robust) does not make two copies distinct."""

from __future__ import annotations

import random

from flywheel.reward_models.bradley_terry import PAIR_COLUMNS, PreferenceDataError, pair_key


def hold_out(
    rows: list[dict], fraction: float, seed: int, source: str
) -> tuple[list[dict], list[dict]]:
    """Train and eval rows: a seeded `fraction` of the distinct pairs of `rows` held out
    with every copy of each, so held-out accuracy is never measured on a training pair.
    PreferenceDataError, naming `source`, when one side would be empty."""
    copies: dict[tuple, list[dict]] = {}  # rows per pair, in first-seen order
    for row in rows:
        copies.setdefault(pair_key(row), []).append(row)
    if len(copies) == 1:
        raise PreferenceDataError(one_pair_message(source, rows))
    pairs = list(copies.values())
    random.Random(seed).shuffle(pairs)
    cut = max(1, round(len(pairs) * fraction))
    if len(pairs) - cut < 1:
        raise PreferenceDataError(
            f"{source}: {len(pairs)} distinct pair(s) leave nothing to train on after the "
            "eval hold-out; add pairs, lower eval_fraction or pass eval_dataset"
        )
    return [r for pair in pairs[cut:] for r in pair], [r for pair in pairs[:cut] for r in pair]


def one_pair_message(source: str, rows: list[dict]) -> str:
    """Why a dataset whose rows are all one pair cannot give a held-out split."""
    pair = ", ".join(f"{c} {str(rows[0].get(c))[:60]!r}" for c in PAIR_COLUMNS)
    return (
        f"{source}: all {len(rows)} row(s) are copies of one pair ({pair}); "
        "nothing can be held out that is not a copy of a training pair, so held-out "
        "accuracy would be measured on the training pair; add distinct pairs or pass "
        "eval_dataset"
    )


def copies_of_train(train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """Eval rows that are copies of a training pair: a count and the first one."""
    seen = {pair_key(r) for r in train_rows}
    hits = [i for i, r in enumerate(eval_rows) if pair_key(r) in seen]
    first = {"example_row": hits[0], "example": eval_rows[hits[0]]} if hits else {}
    return {"count": len(hits), **first}
