"""The parameter reference under docs/flows is what the parameter models say."""

from flywheel.flows.parameter_docs import DOCS, expected


def test_the_parameter_reference_matches_the_parameter_models():
    files = expected()
    stale = [p.name for p, text in files.items() if not p.exists() or p.read_text() != text]
    extra = sorted(p.name for p in set(DOCS.glob("*.md")) - set(files))
    assert not stale and not extra, (
        f"docs/flows is out of date ({stale or extra}): run "
        "`.venv/bin/python -m flywheel.flows.parameter_docs` and commit the result"
    )
    assert len(files) == 13
    # a field's default and meaning reach the page
    text = files[DOCS / "reward-train.md"]
    assert "| `max_length` | int | `256` | >= 8 | tokens per prompt + answer" in text
