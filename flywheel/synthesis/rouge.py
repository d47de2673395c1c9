"""ROUGE-L between short texts, for REFED's diversity filter."""

from __future__ import annotations

from collections import Counter, defaultdict
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

    Returns a keep-flag per text, in order. An inverted index counts shared
    tokens, an upper bound on the LCS, so the exact LCS is computed only for
    pairs that could pass the threshold; without it the filter is quadratic
    in LCS computations and dominates large runs.
    """
    kept_tokens: list[list[str]] = []
    index: dict[str, list[tuple[int, int]]] = defaultdict(list)  # token -> (kept id, count)

    def add(tokens: list[str]) -> None:
        for token, count in Counter(tokens).items():
            index[token].append((len(kept_tokens), count))
        kept_tokens.append(tokens)

    for text in seen:
        add(text.lower().split())
    flags = []
    for text in texts:
        tokens = text.lower().split()
        shared: Counter = Counter()
        for token, count in Counter(tokens).items():
            for j, kept_count in index.get(token, ()):
                shared[j] += min(count, kept_count)
        ok = bool(tokens)
        for j, overlap in shared.items():
            other = kept_tokens[j]
            if 2 * overlap / (len(tokens) + len(other)) <= threshold:
                continue  # even a perfect LCS could not pass the threshold
            if rouge_l(text, " ".join(other)) > threshold:
                ok = False
                break
        flags.append(ok)
        if ok:
            add(tokens)
    return flags
