"""Managed model servers are named entries in a local file that only the user edits.

A command to run is never taken from run parameters, datasets or model files: a
`BackendSpec(kind="vllm", server="qwen")` names an entry of `<data>/servers.toml`
(or `$FLYWHEEL_SERVERS_FILE`), and the entry says what to start:

    [servers.qwen]
    command = ["/opt/vllm-env/bin/vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct",
               "--host", "127.0.0.1", "--port", "8000"]
    base_url = "http://127.0.0.1:8000/v1"
    startup_timeout = 600          # optional; vLLM's first start compiles for minutes
    env = { CUDA_VISIBLE_DEVICES = "0" }   # optional
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.llm.base import BackendError
from flywheel.names import SHORT_NAME_RULE, is_short_name

EXAMPLE = (
    '[servers.NAME]\ncommand = ["/path/to/vllm", "serve", "MODEL", "--port", "8000"]\n'
    'base_url = "http://127.0.0.1:8000/v1"'
)


class ServerConfigError(BackendError):
    """The servers file or the entry a spec names is missing or invalid."""


class ServerEntry(BaseModel):
    """One managed server: the command that starts it and where it answers."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    base_url: str = Field(min_length=1)
    health_url: str | None = None
    startup_timeout: float = Field(600, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


def servers_file() -> Path:
    """`$FLYWHEEL_SERVERS_FILE`, else `servers.toml` in the data folder."""
    if env := os.environ.get("FLYWHEEL_SERVERS_FILE"):
        return Path(env).expanduser().absolute()
    from flywheel.store.naming import data_root

    return data_root() / "servers.toml"


def validate_server_name(name: str) -> str:
    if is_short_name(name):
        return name
    raise ValueError(
        f"invalid server name {name!r}: {SHORT_NAME_RULE}; it names an entry "
        "[servers.<name>] of the servers file"
    )


def read_server_entry(name: str, path: Path | None = None) -> ServerEntry:
    """The entry `[servers.<name>]` of the servers file, validated."""
    path = path or servers_file()
    if not path.is_file():
        raise ServerConfigError(
            f"server {name!r} (field: server) needs the servers file {path}, which does not "
            f"exist; create it with an entry such as:\n{EXAMPLE.replace('NAME', name)}"
        )
    try:
        entries = tomllib.loads(path.read_text()).get("servers", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ServerConfigError(f"{path} is not valid TOML: {e}") from e
    if name not in entries:
        raise ServerConfigError(
            f"no entry [servers.{name}] in {path} (field: server); entries: "
            f"{sorted(entries) or 'none'}"
        )
    try:
        return ServerEntry.model_validate(entries[name])
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ServerConfigError(f"[servers.{name}] in {path}: {problems}") from e
