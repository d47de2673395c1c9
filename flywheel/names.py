"""The one rule for short names: models, adapters and managed servers.

Each becomes a folder name, a peft adapter name or a TOML key, so the rule is strict
and the same everywhere."""

from __future__ import annotations

import re

SHORT_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
SHORT_NAME_MAX_LENGTH = 63
SHORT_NAME_RULE = (
    "a lowercase letter, then up to 62 lowercase letters, digits, '_' or '-' "
    "(regex ^[a-z][a-z0-9_-]{0,62}$)"
)


def is_short_name(name: object) -> bool:
    """Whether `name` is a string that follows SHORT_NAME_RULE."""
    return isinstance(name, str) and SHORT_NAME_RE.fullmatch(name) is not None
