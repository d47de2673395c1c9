"""Model backends behind one small interface: generate, score, next-token top-k."""

from typing import TYPE_CHECKING, Any

from flywheel.llm.base import (
    Backend,
    BackendError,
    ModelNotFound,
    ServerNeverCameUp,
    TokenLogprob,
)
from flywheel.llm.managed_server import ManagedServer
from flywheel.llm.openai_backend import OpenAIBackend
from flywheel.llm.spec import BackendSpec, make_backend, model_fingerprint

if TYPE_CHECKING:
    from flywheel.llm.transformers_backend import TransformersBackend

__all__ = [
    "Backend",
    "BackendError",
    "BackendSpec",
    "ManagedServer",
    "ModelNotFound",
    "OpenAIBackend",
    "ServerNeverCameUp",
    "TokenLogprob",
    "TransformersBackend",
    "make_backend",
    "model_fingerprint",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: torch and transformers take seconds to import,
    # and the HTTP backend and specs do not need them.
    if name == "TransformersBackend":
        from flywheel.llm.transformers_backend import TransformersBackend

        return TransformersBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
