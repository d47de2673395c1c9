"""TransformersBackend on a tiny saved Llama (no downloads)."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from flywheel.llm import (
    BackendError,
    BackendSpec,
    ModelNotFound,
    TransformersBackend,
    make_backend,
)
from flywheel.world.models import new_tiny_model, save_tiny

PROMPTS = ["hello", "ab c", "x", "the quick brown fox", "1+1=", "zz top", "what is 2?", "a"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = new_tiny_model("small", seed=1)
    # A random init mostly repeats the last character; larger weights make the
    # output depend on the whole prompt, so padding mistakes would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3)
    return save_tiny(model, tmp_path_factory.mktemp("llm") / "tiny")


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> TransformersBackend:
    with TransformersBackend(tiny_model_dir, batch_size=3) as b:
        yield b


def test_batched_greedy_equals_one_at_a_time(backend: TransformersBackend) -> None:
    batched = backend.generate(PROMPTS, max_new_tokens=12)
    single = [backend.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)
    assert len(set(batched)) > 1


def test_left_padding_used(backend: TransformersBackend, monkeypatch) -> None:
    assert backend.tokenizer.padding_side == "left"
    seen = []
    generate = backend.lm.generate

    def spy(**kwargs):
        seen.append(kwargs["attention_mask"].clone())
        return generate(**kwargs)

    monkeypatch.setattr(backend.lm, "generate", spy)
    backend.generate(["a", "a much longer prompt"], max_new_tokens=2)
    (mask,) = seen
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # the short prompt is padded on the left
    assert mask[1].all()


def test_sampling_is_seeded(backend: TransformersBackend) -> None:
    a = backend.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    b = backend.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    assert a == b


def test_stop_strings_cut(backend: TransformersBackend) -> None:
    full = backend.generate(PROMPTS, max_new_tokens=12)
    i, text = next((i, t) for i, t in enumerate(full) if len(t) >= 4)
    stop = text[2]
    cut = backend.generate([PROMPTS[i]], max_new_tokens=12, stop=[stop, "never-seen"])
    assert cut == [text[: text.index(stop)]]


def test_score_matches_manual_forward(backend: TransformersBackend) -> None:
    prompts, completions = ["hello ", "1+1=", "a"], ["world", "2", "bc d"]
    scores = backend.score(prompts, completions)
    tok, lm = backend.tokenizer, backend.lm
    for p, c, got in zip(prompts, completions, scores, strict=True):
        p_ids = tok(p)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logps = torch.log_softmax(lm(ids).logits[0].float(), dim=-1)
        want = [logps[len(p_ids) + j - 1, t].item() for j, t in enumerate(c_ids)]
        assert got == pytest.approx(want, abs=1e-4)
    assert backend.score(["x"], [""]) == [[]]


def test_next_token_topk(backend: TransformersBackend) -> None:
    tops = backend.next_token_topk(["hello", "ab c", "x"], k=5)
    assert len(tops) == 3
    for top in tops:
        assert len(top) == 5
        logps = [t.logprob for t in top]
        assert logps == sorted(logps, reverse=True)
        assert sum(torch.tensor(logps).exp()) <= 1 + 1e-5
        assert all(isinstance(t.token, str) and t.token for t in top)
    # The top token is what greedy generation picks next.
    assert backend.generate(["hello"], max_new_tokens=1)[0] == tops[0][0].token


def test_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFound, match="no-such-model"):
        TransformersBackend(missing)
    with pytest.raises(ModelNotFound, match="flywheel world bootstrap"):
        TransformersBackend("nobody/not-a-cached-model")


# --- BackendSpec ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "openai", "model": "m"}, "base_url is required when kind='openai'"),
        ({"model": "m", "base_url": "http://x/v1"}, "base_url is only used"),
        ({"kind": "openai", "model": "m", "base_url": "u", "server": "x"}, "server is only"),
        ({"kind": "vllm", "model": "m"}, "server is required when kind='vllm'"),
        ({"kind": "vllm", "model": "m", "server": "Bad Name"}, "invalid server name"),
        # a command never comes from parameters: the field does not exist
        ({"kind": "vllm", "model": "m", "server": "a", "server_command": ["sh"]}, "server_comm"),
        ({"model": ""}, "model"),
        ({"model": "m", "batch_size": 0}, "batch_size"),
        ({"model": "m", "modle": "typo"}, "modle"),
    ],
)
def test_spec_errors_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BackendSpec(**fields)


def test_spec_vllm_names_an_entry_of_the_servers_file(tmp_path: Path, monkeypatch) -> None:
    from flywheel.llm.servers import ServerConfigError, read_server_entry

    servers = tmp_path / "servers.toml"
    monkeypatch.setenv("FLYWHEEL_SERVERS_FILE", str(servers))
    spec = BackendSpec(kind="vllm", model="org/model", server="qwen")
    with pytest.raises(ServerConfigError, match="does not exist; create it"):
        spec.check()
    servers.write_text(
        '[servers.qwen]\ncommand = ["/nowhere/vllm", "serve", "org/model"]\n'
        'base_url = "http://127.0.0.1:8123/v1"\n'
    )
    entry = read_server_entry("qwen")
    assert entry.command[0] == "/nowhere/vllm" and entry.base_url.endswith(":8123/v1")
    with pytest.raises(BackendError, match="command '/nowhere/vllm' not found"):
        spec.check()
    with pytest.raises(ServerConfigError, match=r"no entry \[servers.other\].*\['qwen'\]"):
        BackendSpec(kind="vllm", model="m", server="other").check()
    servers.write_text('[servers.qwen]\ncommand = []\nbase_url = "u"\nextra = 1\n')
    with pytest.raises(ServerConfigError, match="command.*extra"):
        read_server_entry("qwen")


def test_spec_check_fails_fast_on_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "models" / "tiny")
    with pytest.raises(ModelNotFound) as err:
        BackendSpec(model=missing).check()
    assert str(err.value) == (
        f"model path {missing!r} does not exist (field: model). "
        "Run `flywheel world bootstrap` or pass an existing folder."
    )
    with pytest.raises(ModelNotFound):
        BackendSpec(model="./not-here").check()
    BackendSpec(model="gpt2").check()  # a bare hub name: left to the backend
    BackendSpec(kind="openai", model="./served-name", base_url="http://x/v1").check()


def test_make_backend_transformers(tiny_model_dir: Path) -> None:
    with make_backend(BackendSpec(model=str(tiny_model_dir), batch_size=2)) as backend:
        assert isinstance(backend, TransformersBackend)
        assert backend.batch_size == 2
        assert len(backend.generate(["ab", "c"], max_new_tokens=2)) == 2


def test_chat_prompts_render_with_the_template_and_stop_at_end_of_turn(tmp_path):
    """A model with a chat template: `auto` is chat; messages and a string under chat
    are rendered with the template, the assistant turn opened; generation also ends at
    the template's end-of-turn token when EOS is another token; `raw` leaves text alone."""
    from tests.helpers.own_models import build_model, train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    tok.eos_token = "<|endoftext|>"  # EOS is not the end-of-turn token here
    folder = build_model(tmp_path / "llama", "llama", tok)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    chat = TransformersBackend(folder)
    assert chat.prompt_format == "chat" and end_of_turn in chat._eos_ids
    question = "Write a note about the garden."
    rendered = "<|im_start|>user\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
    assert chat._prompt_ids(question) == tok(rendered, add_special_tokens=False)["input_ids"]
    assert chat._prompt_ids([{"role": "user", "content": question}]) == chat._prompt_ids(question)
    assert chat.generate([question], max_new_tokens=5) == chat.generate(
        [[{"role": "user", "content": question}]], max_new_tokens=5
    )
    raw = TransformersBackend(folder, prompt_format="raw")
    assert end_of_turn not in raw._eos_ids
    assert raw._prompt_ids(question) == tok(question)["input_ids"]

    tok.chat_template = None
    plain = build_model(tmp_path / "plain", "llama", tok)
    assert TransformersBackend(plain).prompt_format == "raw"
    with pytest.raises(ValueError, match="prompt_format 'chat' needs a chat template"):
        TransformersBackend(plain, prompt_format="chat")


def test_in_process_counts_prompts_and_tokens(backend: TransformersBackend) -> None:
    before = backend.counts.as_dict()
    prompts = ["abc", "hello there"]
    out = backend.generate(prompts, max_new_tokens=4)
    ids = [backend._prompt_ids(p) for p in prompts]
    counts = backend.counts
    assert counts.requests - before["requests"] == 2
    assert counts.prompt_tokens - before["prompt_tokens"] == sum(len(i) for i in ids)
    made = counts.completion_tokens - before["completion_tokens"]
    assert 0 < made <= 2 * 4 and any(out)  # greedy on fixed weights: the same every run
