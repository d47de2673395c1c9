"""Configuration for a backend, validated up front, and `make_backend` to build one."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.llm.base import Backend, BackendError, ModelNotFound
from flywheel.llm.chat import PromptFormat
from flywheel.llm.servers import read_server_entry, servers_file, validate_server_name

DEFAULT_BATCH_SIZE = 32
HUB_ID = re.compile(r"\w[\w.-]*/[\w.-]+")


def _in_hub_cache(model: str) -> bool:
    """Whether `model` is a hub id already in the local Hugging Face cache (no network)."""
    if not HUB_ID.fullmatch(model):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:
        return False


class BackendSpec(BaseModel):
    """Which backend to use and how: in process, a running server, or a managed vLLM.

    A managed server is never described here: `server` names an entry of the local
    servers file (`flywheel.llm.servers`), which holds the command to start, so no run
    parameter can make Flywheel run a command.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["transformers", "openai", "vllm"] = "transformers"
    model: str = Field(min_length=1)
    base_url: str | None = None
    server: str | None = Field(
        None, description="kind 'vllm': the name of an entry [servers.<name>] of servers.toml"
    )
    prompt_format: PromptFormat = Field(
        "auto",
        description=(
            "how prompts reach the model: 'chat' renders them with the chat template "
            "(in process) or sends them to /v1/chat/completions (HTTP); 'raw' sends the text "
            "as it is; 'auto' is chat for an in-process model with a chat template and raw "
            "for HTTP (chat-message prompts always go as chat)"
        ),
    )
    device: str = "cpu"
    batch_size: int | None = Field(
        None, ge=1, description="kind 'transformers': prompts per forward pass (default 32)"
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description=(
            "kinds 'openai' and 'vllm': requests kept in flight at most; lowered while the "
            "server answers 429/503 or slows down, then raised again"
        ),
    )
    timeout: float = Field(60, gt=0)
    max_retries: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _check_kind_fields(self) -> Self:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("base_url is required when kind='openai'")
        if self.kind == "transformers" and self.base_url:
            raise ValueError("base_url is only used when kind is 'openai'")
        # None rather than a default, so a spec dumped and read back (flow parameters
        # are) does not look as if batch_size had been set
        if self.kind != "transformers" and self.batch_size is not None:
            raise ValueError(
                f"batch_size is the in-process batch, not used when kind={self.kind!r}: "
                "set max_in_flight (requests in flight at once, default 256) instead"
            )
        if self.kind != "vllm" and self.server is not None:
            raise ValueError("server is only used when kind='vllm'")
        if self.kind == "vllm":
            if self.server is None:
                raise ValueError(
                    "server is required when kind='vllm': the name of an entry "
                    "[servers.<name>] in the servers file (data/servers.toml), which holds "
                    "the command that starts it"
                )
            validate_server_name(self.server)
            if self.base_url is not None:
                raise ValueError(
                    "base_url is not used when kind='vllm': it comes from the server entry"
                )
        return self

    def chunks_at_once(self, chunk_size: int) -> int:
        """How many chunks of `chunk_size` calls to work on at once with this backend: one
        in process (it works one batch at a time); over HTTP enough that `max_in_flight`
        requests stay in flight while a chunk's slowest ones finish."""
        if self.kind == "transformers":
            return 1
        return -(-self.max_in_flight // chunk_size) + 1

    def check(self) -> None:
        """Fail fast, before expensive work, on a model path or server entry that is missing."""
        if self.kind == "transformers":
            looks_like_path = self.model.startswith((".", "/", "~")) or "/" in self.model
            if (
                looks_like_path
                and not Path(self.model).expanduser().exists()
                and not _in_hub_cache(self.model)
            ):
                raise ModelNotFound(
                    f"model path {self.model!r} does not exist (field: model). "
                    "Run `flywheel world bootstrap` or pass an existing folder."
                )
        if self.kind == "vllm":
            entry = read_server_entry(self.server)  # type: ignore[arg-type]
            exe = entry.command[0]
            if shutil.which(exe) is None and not Path(exe).is_file():
                raise BackendError(
                    f"server {self.server!r}: command {exe!r} not found (servers file "
                    f"{servers_file()}). Install vLLM in its own environment and give the full "
                    "path to its `vllm` executable there."
                )


def model_fingerprint(spec: BackendSpec) -> str:
    """What identifies the model behind a spec, for cache keys: for a local folder its
    config and its weight files' sizes and times, so retrained weights give a new key."""
    folder = Path(spec.model).expanduser()
    if not folder.is_dir():
        return f"{spec.kind}:{spec.model}:{spec.base_url or spec.server}"
    parts = [spec.kind, str(folder.resolve())]
    for path in sorted(folder.iterdir()):
        if path.name == "config.json":
            parts.append(path.read_text())
        elif path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def make_backend(spec: BackendSpec) -> Backend:
    """Build the backend a spec describes; for vllm, start the server first."""
    from flywheel.llm.openai_backend import OpenAIBackend

    spec.check()
    if spec.kind == "transformers":
        from flywheel.llm.transformers_backend import TransformersBackend

        return TransformersBackend(
            spec.model,
            device=spec.device,
            batch_size=spec.batch_size or DEFAULT_BATCH_SIZE,
            prompt_format=spec.prompt_format,
        )
    options = dict(
        timeout=spec.timeout,
        max_retries=spec.max_retries,
        max_in_flight=spec.max_in_flight,
        prompt_format=spec.prompt_format,
    )
    if spec.kind == "openai":
        assert spec.base_url is not None  # the validator guarantees it
        return OpenAIBackend(spec.base_url, spec.model, **options)
    from flywheel.llm.managed_server import ManagedServer

    entry = read_server_entry(spec.server)  # type: ignore[arg-type]
    server = ManagedServer(
        entry.command,
        entry.base_url,
        health_url=entry.health_url,
        startup_timeout=entry.startup_timeout,
        env=entry.env,
    ).start()
    return OpenAIBackend(entry.base_url, spec.model, server=server, **options)
