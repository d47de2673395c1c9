"""ROUGE-L between short texts, for REFED's diversity filter."""

from __future__ import annotations

from collections.abc import Iterable


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens."""
    ta, tb = a.lower().split(), b.lower().split()
    if not ta or not tb:
        return 0.0
    lcs = _lcs(ta, tb)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(ta), lcs / len(tb)
    return 2 * precision * recall / (precision + recall)


def diverse_subset(texts: Iterable[str], threshold: float, seen: Iterable[str] = ()) -> list[bool]:
    """Keep a text only if its ROUGE-L with every text kept before (and `seen`) is <= threshold.

    Returns a keep-flag per text, in order. Exact repeats are caught by a set
    before any LCS is computed.
    """
    kept: list[str] = list(seen)
    kept_set = {t.lower().strip() for t in kept}
    flags = []
    for text in texts:
        key = text.lower().strip()
        ok = key not in kept_set and all(rouge_l(text, k) <= threshold for k in kept)
        flags.append(ok)
        if ok:
            kept.append(text)
            kept_set.add(key)
    return flags
