"""Collab decoding over the world's tiny models: greedy limit, the stated token value,
agent switches, call accounting, bad inputs and failed calls."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import pytest

from flywheel.decoders.collab import (
    BestOfNOutput,
    CollabConfig,
    best_of_n_decode,
    collab_decode,
)
from flywheel.llm.base import Backend, BackendError, TokenLogprob
from flywheel.llm.openai_backend import OpenAIBackend
from flywheel.world.tasks import check, sample_tasks
from tests.helpers.completions_server import CompletionsServer, completion, top_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = {"<pad>", "<s>", "<unk>"}  # never proposed; "</s>" ends the text


def oracle(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The world's check of the answer: 1 for the right answer to a task prompt, else 0."""
    return [check(p.removesuffix("="), c) for p, c in zip(prompts, completions, strict=True)]


def task_prompts(n: int, seed: int = 0) -> list[str]:
    return [t.prompt for t in sample_tasks(n, random.Random(seed), min_len=3, max_len=5)]


@pytest.fixture(scope="module")
def agents(world_models: Path) -> Iterator[list[Backend]]:
    from flywheel.llm.transformers_backend import TransformersBackend

    small = TransformersBackend(world_models / "world-small")
    large = TransformersBackend(world_models / "world-large")
    yield [small, large]
    small.close()
    large.close()


def test_one_agent_with_large_alpha_is_its_greedy_decoding(agents) -> None:
    small = agents[0]
    prompts = task_prompts(6)
    greedy = small.generate(prompts, max_new_tokens=10)
    for k, alpha in ((1, 10.0), (3, 1e6)):
        outs = collab_decode(
            [small], oracle, prompts, k=k, alpha=alpha, rollout_len=2, max_new_tokens=10
        )
        assert [o.completion for o in outs] == greedy
        for out in outs:
            assert set(out.agents) <= {0}
            assert out.reward == oracle([out.prompt], [out.completion])[0]


def test_chosen_token_maximises_the_stated_value(agents) -> None:
    config = CollabConfig(k=3, rollout_len=6, alpha=0.3, max_new_tokens=10)
    prompts = task_prompts(6, seed=1)
    outs = collab_decode(agents, oracle, prompts, config)
    out = next(o for o in outs if len(o.tokens) >= 2)
    step_no = 1
    prefix = "".join(out.tokens[:step_no])

    # recompute step 1's candidates one call at a time, outside the decoder
    expected = []
    for j, agent in enumerate(agents):
        for tok, logprob in agent.next_token_topk([out.prompt + prefix], config.k)[0]:
            if tok in SPECIALS:
                continue
            if tok == "</s>":
                text = prefix
            else:
                rollout = agent.generate(
                    [out.prompt + prefix + tok], max_new_tokens=config.rollout_len
                )[0]
                text = prefix + tok + rollout
            q = oracle([out.prompt], [text])[0]
            expected.append((j, tok, q + config.alpha * logprob))
    step = out.steps[step_no]
    got = [(c.agent, c.token, c.value) for c in step.candidates]
    assert [(j, t) for j, t, _ in got] == [(j, t) for j, t, _ in expected]
    for (_, _, v), (_, _, w) in zip(got, expected, strict=True):
        assert v == pytest.approx(w, abs=1e-4)
    best = max(expected, key=lambda e: e[2])
    assert step.choice is not None
    assert (step.choice.agent, step.choice.token) == best[:2]
    assert out.tokens[step_no] == best[1] and out.agents[step_no] == best[0]

    # call accounting: K top-k calls per step plus one per continuation rolled out
    for o in outs:
        rolled = sum(c.ends is None for s in o.steps for c in s.candidates)
        assert o.topk_calls == len(agents) * len(o.steps)
        assert o.rollout_calls == rolled
        assert o.model_calls == len(agents) * len(o.steps) + rolled
        assert o.reward_calls == sum(len(s.candidates) for s in o.steps) + 1
        assert o.agents == [s.choice.agent for s in o.steps if s.choice.ends != "eos"]


def test_agent_switches_are_recorded(agents, tmp_path: Path) -> None:
    """A trained and an untrained model, and a reward that wants the untrained model's
    first token and then the trained model's: the writer must change after one token."""
    from flywheel.llm.transformers_backend import TransformersBackend
    from flywheel.world.models import new_tiny_model, save_tiny

    trained = agents[0]
    untrained = TransformersBackend(save_tiny(new_tiny_model("small", seed=7), tmp_path / "m"))

    def top1(agent: Backend, text: str) -> str:
        return agent.next_token_topk([text], 1)[0][0].token

    for prompt in task_prompts(20, seed=2):
        r0, s0 = top1(untrained, prompt), top1(trained, prompt)
        if r0 in SPECIALS | {"</s>"} or r0 == s0:
            continue
        s1, r1 = top1(trained, prompt + r0), top1(untrained, prompt + r0)
        if s1 not in SPECIALS | {"</s>"} and s1 != r1:
            break
    else:
        pytest.fail("no prompt on which the two models disagree twice")
    target = r0 + s1

    def common_prefix(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(len(os.path.commonprefix([c, target]))) for c in completions]

    [out] = collab_decode(
        [trained, untrained],
        common_prefix,
        [prompt],
        k=1,
        alpha=0.0,
        rollout_len=0,
        max_new_tokens=2,
    )
    assert out.completion == target
    assert out.agents == [1, 0] and out.switches == 1
    assert out.finish_reason == "length"
    # no rollouts at rollout_len 0: the calls are the top-k calls alone
    assert (out.model_calls, out.rollout_calls, out.reward_calls) == (4, 0, 5)
    assert out.reward == 2.0


def test_best_of_n_keeps_the_best_sample_and_counts_calls(agents) -> None:
    prompts = task_prompts(3, seed=3)
    outs = best_of_n_decode(agents[0], oracle, prompts, 4, max_new_tokens=10, temperature=1.0)
    for out in outs:
        assert isinstance(out, BestOfNOutput)
        assert len(out.samples) == len(out.rewards) == 4
        assert out.model_calls == 4 and out.reward_calls == 4
        assert out.reward == max(out.rewards)
        assert out.completion == out.samples[out.rewards.index(out.reward)]
        assert out.rewards == oracle([out.prompt] * 4, out.samples)


# --- fakes pin the validation and failure paths ---


class FakeBackend(Backend):
    """Proposes fixed tokens and writes fixed text; fails where told to, with raw text."""

    def __init__(self, fail: Collection[str] = (), fail_seeds: Collection[int] = ()) -> None:
        self.model = "fake"
        self.fail, self.fail_seeds = fail, fail_seeds

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, stop=None, seed=None):
        if "generate" in self.fail or seed in self.fail_seeds:
            raise BackendError("completions response did not parse", raw='{"choices": [oops')
        return ["xy"] * len(prompts)

    def score(self, prompts, completions):
        raise NotImplementedError

    def next_token_topk(self, prefixes, k=5):
        if "topk" in self.fail:
            raise BackendError("no top_logprobs in the response", raw='{"choices": []}')
        return [[TokenLogprob("a", -0.1), TokenLogprob("b", -2.0)][:k] for _ in prefixes]


def constant(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    return [0.0] * len(prompts)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"k": 0}, "k"),
        ({"rollout_len": -1}, "rollout_len"),
        ({"alpha": -0.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"topk": 3}, "topk"),
    ],
)
def test_bad_parameters_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        collab_decode([FakeBackend()], constant, ["p"], **options)


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="agents"):
        collab_decode([], constant, ["p"])
    with pytest.raises(TypeError, match=r"agents\[0\]"):
        collab_decode(["not a backend"], constant, ["p"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="prompts"):
        collab_decode([FakeBackend()], constant, [])
    with pytest.raises(ValueError, match="prompts"):
        collab_decode([FakeBackend()], constant, "p")
    with pytest.raises(ValueError, match="either config or its fields"):
        collab_decode([FakeBackend()], constant, ["p"], CollabConfig(), k=2)
    with pytest.raises(ValueError, match="reward: returned 0 scores"):
        collab_decode([FakeBackend()], lambda p, c: [], ["p"])
    with pytest.raises(ValueError, match="n: must be >= 1"):
        best_of_n_decode(FakeBackend(), constant, ["p"], 0)
    with pytest.raises(ValueError, match="temperature"):
        best_of_n_decode(FakeBackend(), constant, ["p"], 2, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        best_of_n_decode(FakeBackend(), constant, ["p"], 2, max_new_tokens=0)


def test_stop_strings_and_extra_eos_tokens_end_the_text() -> None:
    # "a" completes the stop string: the text ends there, cut before it, with no rollout
    [out] = collab_decode([FakeBackend()], constant, ["p"], k=2, stop=["a"])
    assert (out.completion, out.tokens, out.finish_reason) == ("", ["a"], "stop")
    assert (out.rollout_calls, out.steps[0].candidates[1].rollout) == (1, "xy")
    # "b" named as an EOS text; rewarded, it is chosen and ends the text
    [out] = collab_decode(
        [FakeBackend()],
        lambda p, c: [float(x == "") for x in c],
        ["p"],
        k=2,
        eos_tokens=["b"],
    )
    assert (out.completion, out.finish_reason, out.model_calls) == ("", "eos", 2)


def test_failed_calls_are_recorded_with_their_raw_text(agents) -> None:
    prompts = task_prompts(2, seed=4)
    # a failing agent beside a working one: the working one writes everything
    outs = collab_decode(
        [FakeBackend(fail={"topk"}), agents[0]], oracle, prompts, k=2, max_new_tokens=3
    )
    for out in outs:
        assert set(out.agents) == {1} and out.reward is not None
        assert len(out.failures) == len(out.steps) == out.topk_calls // 2
        assert {(f.stage, f.agent, f.raw) for f in out.failures} == {("topk", 0, '{"choices": []}')}

    # every call fails: nothing is valued, the output says so and keeps the raw text
    [out] = collab_decode([FakeBackend(fail={"topk"})], constant, ["p"], max_new_tokens=3)
    assert (out.finish_reason, out.completion, out.reward) == ("failed", "", None)
    assert [(f.stage, f.step, f.raw) for f in out.failures] == [("topk", 0, '{"choices": []}')]

    # rollouts fail: the candidates get no Q (not an empty continuation)
    [out] = collab_decode([FakeBackend(fail={"generate"})], constant, ["p"], k=2)
    assert out.finish_reason == "failed" and out.rollout_calls == 2
    assert [c.q for c in out.steps[0].candidates] == [None, None]
    assert [(f.stage, f.raw) for f in out.failures] == [("rollout", '{"choices": [oops')]

    # best-of-n: a failed draw is recorded and still counted as a call
    [out] = best_of_n_decode(FakeBackend(fail_seeds={1}), constant, ["p"], 3)
    assert out.samples == ["xy", "xy"] and out.model_calls == 3
    assert [(f.stage, f.step, f.raw) for f in out.failures] == [
        ("generate", 1, '{"choices": [oops')
    ]
    [out] = best_of_n_decode(FakeBackend(fail={"generate"}), constant, ["p"], 2)
    assert (out.completion, out.reward, len(out.failures)) == (None, None, 2)


# --- an HTTP agent whose server answers some prompts with malformed bodies ---


def stand_in_agent(payload: dict) -> tuple[int, str]:
    """Top-k requests (they ask for logprobs) and rollouts (they do not) of a stand-in
    agent: malformed bodies, naming their request's prompt, where the prompt asks for it."""
    prompt = payload["prompt"]
    if "logprobs" in payload:
        if "bad-topk" in prompt:
            return 200, f"<html>top-k failed for {prompt!r}</html>"
        return 200, top_logprobs({"a": -0.1, "b": -2.0})
    if "bad-gen" in prompt:
        return 200, json.dumps({"error": f"no choices for {prompt!r}"})
    return 200, completion("xy")


@pytest.fixture
def http_agent() -> Iterator[OpenAIBackend]:
    with CompletionsServer(stand_in_agent) as server:
        with OpenAIBackend(server.base_url, "stand-in", max_retries=0, max_in_flight=4) as agent:
            yield agent


def test_each_prompt_keeps_its_own_failed_call_and_no_other(http_agent) -> None:
    prompts = ["p1 ", "p2 bad-topk ", "p3 ", "p4 bad-topk ", "p5 bad-gen "]
    outs = collab_decode([http_agent], constant, prompts, k=2, rollout_len=3, max_new_tokens=2)
    ok, topk_bad, roll_bad = [outs[0], outs[2]], [outs[1], outs[3]], outs[4]
    for out in ok:
        assert out.failures == [] and out.finish_reason == "length" and out.completion == "aa"
    for out in topk_bad:
        [f] = out.failures
        assert (f.stage, f.agent, f.step) == ("topk", 0, 0)
        assert f.raw == f"<html>top-k failed for {out.prompt!r}</html>"
        assert "malformed completions response" in f.error
        assert (out.finish_reason, out.reward) == ("failed", None)
    # both candidates' rollouts failed, each with its own raw reply
    assert [(f.stage, f.raw) for f in roll_bad.failures] == [
        ("rollout", json.dumps({"error": f"no choices for {roll_bad.prompt + t!r}"}))
        for t in ("a", "b")
    ]
    assert roll_bad.finish_reason == "failed" and roll_bad.rollout_calls == 2


def test_best_of_n_keeps_each_prompts_own_failed_draws(http_agent) -> None:
    outs = best_of_n_decode(http_agent, constant, ["q1", "q2 bad-gen", "q3"], 2, max_new_tokens=3)
    for out in (outs[0], outs[2]):
        assert out.samples == ["xy", "xy"] and out.failures == [] and out.completion == "xy"
    bad = outs[1]
    assert (bad.samples, bad.completion, bad.reward, bad.model_calls) == ([], None, None, 2)
    raw = json.dumps({"error": "no choices for 'q2 bad-gen'"})
    assert [(f.stage, f.step, f.raw) for f in bad.failures] == [
        ("generate", 0, raw),
        ("generate", 1, raw),
    ]
