"""OpenAIBackend over chat against a real `transformers serve` on a tiny chat model built
here (random weights, a ChatML template, nothing downloaded)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from flywheel.llm import BackendError, ManagedServer, OpenAIBackend
from tests.helpers.own_models import build_model, train_tokenizer

SERVE_EXTRA = (
    "`transformers serve` needs FastAPI, Uvicorn and openai: pip install 'transformers[serving]'"
)
for module in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(module, reason=SERVE_EXTRA)


class Served(NamedTuple):
    base_url: str
    model_dir: Path
    tokenizer: object


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`transformers serve`, pinned to a tiny Qwen2 chat model in a local folder."""
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(root / "tokenizer")
    model_dir = build_model(root / "qwen2", "qwen2", tok)
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    # A local folder as the pinned model: requests must name that same path.
    command = [exe, "serve", model_dir, "--host", "127.0.0.1", "--port", port, "--device", "cpu"]
    base_url = f"http://127.0.0.1:{port}/v1"
    with ManagedServer(
        command,
        base_url,
        startup_timeout=120,
        env={"HF_HUB_OFFLINE": "1"},  # it must not reach the hub
        log_path=root / "serve.log",
    ):
        yield Served(base_url, model_dir, tok)


def n_tokens(tokenizer, text: str) -> int:
    """Tokens of a generated text. A random model can emit byte tokens that are no valid
    UTF-8: each U+FFFD they decode to counts once (it re-encodes to three bytes)."""
    clean = text.replace("\ufffd", "")
    return len(tokenizer(clean, add_special_tokens=False)["input_ids"]) + text.count("\ufffd")


def test_generate_over_chat(served: Served) -> None:
    system = {"role": "system", "content": "You answer briefly."}
    question = "Please write a short note about the garden."
    prompts = [
        question,
        [{"role": "user", "content": question}],
        [system, {"role": "user", "content": "trains"}],
    ]
    with OpenAIBackend(
        served.base_url, str(served.model_dir), prompt_format="chat", max_in_flight=3
    ) as backend:
        texts = backend.generate(prompts, max_new_tokens=6)
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
        assert any(texts)  # a random model may end a turn at once, not on every prompt
        assert all(n_tokens(served.tokenizer, t) <= 6 for t in texts)
        # Under `chat` a string is one user message: the same request, the same greedy text.
        assert texts[0] == texts[1]
        longer = backend.generate(prompts[:1], max_new_tokens=12)[0]
        assert n_tokens(served.tokenizer, longer) <= 12 and longer.startswith(texts[0])
        sampled = backend.generate(prompts, max_new_tokens=4, temperature=1.0, seed=3)
        assert all(isinstance(t, str) and n_tokens(served.tokenizer, t) <= 4 for t in sampled)


def test_generate_over_chat_matches_the_in_process_backend(served: Served) -> None:
    from flywheel.llm import TransformersBackend

    prompts = ["Please write a kind note about trains.", [{"role": "user", "content": "a bicycle"}]]
    local = TransformersBackend(served.model_dir, prompt_format="chat")
    with OpenAIBackend(served.base_url, str(served.model_dir), prompt_format="chat") as backend:
        assert backend.generate(prompts, max_new_tokens=8) == local.generate(
            prompts, max_new_tokens=8
        )


def test_logprobs_over_chat_report_what_the_server_lacks(served: Served) -> None:
    # `transformers serve` ignores `logprobs` and rejects vLLM's `prompt_logprobs`.
    with OpenAIBackend(served.base_url, str(served.model_dir), prompt_format="chat") as backend:
        with pytest.raises(BackendError, match="must return logprobs for chat") as err:
            backend.chat_next_token_topk(["Is it raining?"], k=3)
        assert err.value.raw and '"choices"' in err.value.raw
        with pytest.raises(BackendError, match="prompt_logprobs") as err:
            backend.score(["Is it raining?"], ["Yes."])
        assert err.value.raw and "prompt_logprobs" in err.value.raw
