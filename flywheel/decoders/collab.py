"""Collab: controlled decoding with a mixture of agents (Chakraborty et al., ICLR 2025).

Several off-the-shelf policies (the agents, any `Backend`) write one text together
for a target reward that none of them was trained on. At every token step, for
each prompt's current text:

1. each agent j proposes its top-k next tokens with their log-probs log pi_j(t)
   (`next_token_topk`, one call per agent, batched over prompts);
2. each candidate (j, t) gets an implicit Q: the target reward of
   completion + t + a greedy continuation of `rollout_len` tokens written by the
   same agent j (`generate`, temperature 0, batched over candidates). A candidate
   that ends the text (an EOS token, or a token that completes a stop string)
   needs no continuation: its Q is the reward of the text it ends;
3. the candidate with the largest value Q(t) + alpha * log pi_j(t) is appended,
   so the agent that writes can change at every token. Decoding stops at an EOS,
   a stop string or `max_new_tokens` steps.

The paper's objective, for each agent j taken as the reference policy, is the
KL-regularised return  E[r_target] - alpha * KL(pi || pi_j), whose optimum at a
step is pi*_j(t) = pi_j(t) exp(Q_j(t) / alpha) / Z_j. The value we maximise is
alpha * log of that policy's unnormalised weight: Q_j(t) + alpha * log pi_j(t).
Why this form: taking the agent that proposed a token as its reference keeps the
choice close to a policy that actually wrote that token (the paper's
"policy-switching" reading), needs only the log-probs the agents already return,
and has the two limits one expects: alpha = 0 chooses by implicit Q alone (the
top-k restriction is then what keeps the text close to the agents), and a large
alpha follows the most confident agent, so with one agent it is that agent's
greedy decoding. Comparing across agents with the unnormalised weight (rather
than pi*_j itself) ranks a candidate by its own soft value and not by how the
rest of agent j's top-k did.

Choices where the paper is silent, or where it meets this project's interface:

- Agents are text-level: a token is the text piece an agent's `next_token_topk`
  returns, appended to the text and re-tokenized by whichever agent goes next.
  Agents whose tokenizers differ are therefore allowed; their log-probs are then
  over different vocabularies, so with alpha > 0 the comparison across agents is
  only approximate (with one shared tokenizer, as in the embedded world, it is
  exact).
- Q comes from a single greedy continuation of `rollout_len` tokens (the paper's
  implicit Q estimated by a rollout; `rollout_len = 0` scores the prefix alone).
- The token is chosen by argmax of the value, not sampled from pi*_j, so a
  decoding is deterministic given the agents. Ties go to the earlier agent in
  the list, then to its more likely token.
- End of text: a candidate equal to an agent's EOS text (read from its tokenizer
  when it has one, plus `eos_tokens`) or an empty piece ends the text; other
  special tokens of an agent's tokenizer (padding, BOS, unknown) are never
  proposed. For an HTTP backend, pass its EOS text in `eos_tokens`.
- Call accounting (per prompt, so a benchmark can compare at equal calls): one
  model call per agent per step for the top-k, plus one per continuation rolled
  out; reward evaluations are counted apart. A step therefore costs
  K + (candidates that do not end the text) model calls, at most K * (1 + k).
- A failed call (`BackendError`) is recorded with its raw text in `failures`;
  its candidates take no part in the choice (they are never given an empty
  continuation or a zero value). A prompt none of whose candidates could be
  valued stops with finish_reason "failed" and reward None. A malformed answer
  (`MalformedResponse`) is recorded in the output of the prompt it answered only,
  with its own raw text; a batched call that fails as a whole (a server that
  cannot be reached) is recorded in each output it was made for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.llm.base import Backend, BackendError, TokenLogprob, call_each, cut_at_stop

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""A target reward: one score per (prompt, completion) pair, higher is better."""

FinishReason = Literal["eos", "stop", "length", "failed"]


class CollabConfig(BaseModel):
    """Collab's parameters, validated before any model is called."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(5, ge=1, description="tokens each agent proposes per step")
    rollout_len: int = Field(16, ge=0, description="greedy tokens rolled out to estimate Q")
    alpha: float = Field(0.1, ge=0, allow_inf_nan=False, description="KL regularisation")
    max_new_tokens: int = Field(64, ge=1, description="token steps, a final EOS included")
    stop: list[str] = Field(default_factory=list)
    eos_tokens: list[str] = Field(
        default_factory=list, description="extra token texts that end a text"
    )


@dataclass(frozen=True)
class CallFailure:
    """A model call that failed: where, which agent, the error and the raw response.

    `step` is the token step for Collab and the draw for best-of-N.
    """

    stage: Literal["topk", "rollout", "generate"]
    agent: int
    step: int
    error: str
    raw: str | None


@dataclass
class Candidate:
    """One proposed token: who proposed it, its log-prob, its rollout, Q and value."""

    agent: int
    token: str
    logprob: float
    ends: FinishReason | None = None  # "eos" or "stop" when choosing it ends the text
    rollout: str | None = None
    q: float | None = None  # None when its rollout failed
    value: float | None = None


@dataclass
class Step:
    """One token step: every candidate considered and the index of the chosen one."""

    candidates: list[Candidate]
    chosen: int | None = None

    @property
    def choice(self) -> Candidate | None:
        return None if self.chosen is None else self.candidates[self.chosen]


@dataclass
class CollabOutput:
    """The result for one prompt.

    `tokens[i]` was written by agent `agents[i]` (an index into the agent list);
    `steps` holds every step's candidates, including a final step that chose an
    EOS (which adds no text). `reward` is the target reward of `completion`, or
    None when decoding failed.
    """

    prompt: str
    completion: str = ""
    tokens: list[str] = field(default_factory=list)
    agents: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    reward: float | None = None
    topk_calls: int = 0
    rollout_calls: int = 0
    reward_calls: int = 0
    failures: list[CallFailure] = field(default_factory=list)

    @property
    def model_calls(self) -> int:
        """Every backend call made for this prompt (top-k and rollouts)."""
        return self.topk_calls + self.rollout_calls

    @property
    def switches(self) -> int:
        """How many times the writing agent changed between consecutive tokens."""
        return sum(a != b for a, b in zip(self.agents, self.agents[1:], strict=False))


def _check_inputs(agents: Sequence[Backend], prompts: Sequence[str]) -> None:
    if not agents:
        raise ValueError("agents: at least one agent (a Backend) is needed")
    for i, agent in enumerate(agents):
        if not isinstance(agent, Backend):
            raise TypeError(f"agents[{i}] is a {type(agent).__name__}, not a Backend")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts: a non-empty list of prompt strings is needed")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}, not a str")


def _rewards(reward: RewardFn, prompts: list[str], completions: list[str]) -> list[float]:
    """Call the target reward and check that it gave one finite number per pair."""
    if not prompts:
        return []
    scores = list(reward(prompts, completions))
    if len(scores) != len(prompts):
        raise ValueError(f"reward: returned {len(scores)} scores for {len(prompts)} completions")
    out = [float(s) for s in scores]
    if not all(math.isfinite(s) for s in out):
        raise ValueError(f"reward: returned a non-finite score ({out})")
    return out


def _special_texts(agent: Backend, extra_eos: Sequence[str]) -> tuple[set[str], set[str]]:
    """(texts that end a text, other special texts never to append) for an agent."""
    eos = {"", *extra_eos}
    tok = getattr(agent, "tokenizer", None)
    if tok is None:
        return eos, set()
    if tok.eos_token:
        eos.add(tok.eos_token)
    lm = getattr(agent, "lm", None)
    ids = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    for i in [ids] if isinstance(ids, int) else ids or []:
        eos.add(tok.decode([i]))
    return eos, set(getattr(tok, "all_special_tokens", ())) - eos


def _failure(stage: Any, agent: int, step: int, error: BackendError) -> CallFailure:
    return CallFailure(stage, agent, step, str(error), error.raw)


def collab_decode(
    agents: Sequence[Backend],
    reward: RewardFn,
    prompts: Sequence[str],
    config: CollabConfig | None = None,
    **options: Any,
) -> list[CollabOutput]:
    """Decode every prompt with Collab; one `CollabOutput` per prompt, in order.

    Pass either a `CollabConfig` or its fields as keyword arguments
    (`k`, `rollout_len`, `alpha`, `max_new_tokens`, `stop`, `eos_tokens`).
    """
    if config is not None and options:
        raise ValueError(f"pass either config or its fields, not both (got {sorted(options)})")
    config = config or CollabConfig(**options)
    _check_inputs(agents, prompts)
    specials = [_special_texts(a, config.eos_tokens) for a in agents]
    outputs = [CollabOutput(prompt=p) for p in prompts]
    done: set[int] = set()
    for step_no in range(config.max_new_tokens):
        active = [i for i in range(len(outputs)) if i not in done]
        if not active:
            break
        steps = _propose(agents, config, specials, outputs, active, step_no)
        _estimate_q(agents, reward, config, outputs, steps, step_no)
        for i, step in steps.items():
            if _advance(outputs[i], step, config):
                done.add(i)
    scored = [o for o in outputs if o.finish_reason != "failed"]
    finals = _rewards(reward, [o.prompt for o in scored], [o.completion for o in scored])
    for out, score in zip(scored, finals, strict=True):
        out.reward = score
        out.reward_calls += 1
    return outputs


def _propose(
    agents: Sequence[Backend],
    config: CollabConfig,
    specials: list[tuple[set[str], set[str]]],
    outputs: list[CollabOutput],
    active: list[int],
    step_no: int,
) -> dict[int, Step]:
    """Each agent's top-k tokens for every active prompt (one batched call per agent)."""
    steps = {i: Step([]) for i in active}
    prefixes = [outputs[i].prompt + outputs[i].completion for i in active]
    for j, agent in enumerate(agents):
        for i in active:
            outputs[i].topk_calls += 1
        try:
            proposals = call_each(partial(agent.next_token_topk, k=config.k), prefixes)
        except BackendError as e:  # the call failed as a whole: each prompt lost it
            for i in active:
                outputs[i].failures.append(_failure("topk", j, step_no, e))
            continue
        if len(proposals) != len(active):
            raise ValueError(
                f"agents[{j}].next_token_topk returned {len(proposals)} lists "
                f"for {len(active)} prefixes"
            )
        eos, skip = specials[j]
        for i, tops in zip(active, proposals, strict=True):
            if isinstance(tops, BackendError):  # this prompt's own malformed answer
                outputs[i].failures.append(_failure("topk", j, step_no, tops))
                continue
            for top in tops[: config.k]:
                if top.token in skip:
                    continue
                steps[i].candidates.append(_candidate(j, top, eos, outputs[i], config))
    return steps


def _candidate(
    agent: int, top: TokenLogprob, eos: set[str], out: CollabOutput, config: CollabConfig
) -> Candidate:
    """A proposal, marked with how it would end the text (if it would)."""
    if top.token in eos:
        return Candidate(agent, top.token, top.logprob, ends="eos")
    text = out.completion + top.token
    ends: FinishReason | None = "stop" if cut_at_stop(text, config.stop) != text else None
    return Candidate(agent, top.token, top.logprob, ends=ends)


def _estimate_q(
    agents: Sequence[Backend],
    reward: RewardFn,
    config: CollabConfig,
    outputs: list[CollabOutput],
    steps: dict[int, Step],
    step_no: int,
) -> None:
    """Fill each candidate's rollout, Q and value: rollouts batched per agent, one reward call."""
    for j, agent in enumerate(agents):
        todo = [
            (i, c)
            for i, step in steps.items()
            for c in step.candidates
            if c.agent == j and c.ends is None
        ]
        if config.rollout_len == 0 or not todo:
            for _, c in todo:
                c.rollout = ""
            continue
        for i, _ in todo:
            outputs[i].rollout_calls += 1
        texts = [outputs[i].prompt + outputs[i].completion + c.token for i, c in todo]
        rollout = partial(
            agent.generate,
            max_new_tokens=config.rollout_len,
            temperature=0.0,
            stop=config.stop or None,
        )
        try:
            rollouts = call_each(rollout, texts)
        except BackendError as e:  # the call failed as a whole: each prompt lost it
            for i in dict.fromkeys(i for i, _ in todo):
                outputs[i].failures.append(_failure("rollout", j, step_no, e))
            continue
        if len(rollouts) != len(todo):
            raise ValueError(
                f"agents[{j}].generate returned {len(rollouts)} texts for {len(todo)} prompts"
            )
        for (i, c), text in zip(todo, rollouts, strict=True):
            if isinstance(text, BackendError):  # this candidate's own malformed answer
                outputs[i].failures.append(_failure("rollout", j, step_no, text))
            else:
                c.rollout = text
    valued = [
        (i, c, _ended_text(outputs[i], c, config))
        for i, step in steps.items()
        for c in step.candidates
        if c.ends is not None or c.rollout is not None
    ]
    qs = _rewards(reward, [outputs[i].prompt for i, _, _ in valued], [t for _, _, t in valued])
    for (i, c, _), q in zip(valued, qs, strict=True):
        outputs[i].reward_calls += 1
        c.q = q
        # alpha = 0 is Q alone, even for a token whose log-prob is -inf
        c.value = q + config.alpha * c.logprob if config.alpha else q


def _ended_text(out: CollabOutput, c: Candidate, config: CollabConfig) -> str:
    """The completion Q is computed on: the text the candidate ends, or its rollout."""
    if c.ends == "eos":
        return out.completion
    if c.ends == "stop":
        return cut_at_stop(out.completion + c.token, config.stop)
    return out.completion + c.token + (c.rollout or "")


def _advance(out: CollabOutput, step: Step, config: CollabConfig) -> bool:
    """Append the step's best candidate to the output; True when the output is finished."""
    out.steps.append(step)
    values = {n: c.value for n, c in enumerate(step.candidates) if c.value is not None}
    if not values:
        out.finish_reason = "failed"
        return True
    # max keeps the first of equal values: the earlier agent, then its likelier token
    step.chosen = max(values, key=values.__getitem__)
    best = step.candidates[step.chosen]
    if best.ends == "eos":
        out.finish_reason = "eos"
        return True
    out.tokens.append(best.token)
    out.agents.append(best.agent)
    if best.ends == "stop":
        out.completion = cut_at_stop(out.completion + best.token, config.stop)
        out.finish_reason = "stop"
        return True
    out.completion += best.token
    return False


# --- the baseline: best-of-N with the same call accounting ---


@dataclass
class BestOfNOutput:
    """Best of n sampled completions for one prompt, by the target reward.

    `completion` and `reward` are None when every draw failed; `samples` and
    `rewards` hold the draws that succeeded, in draw order.
    """

    prompt: str
    completion: str | None = None
    reward: float | None = None
    samples: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    model_calls: int = 0
    reward_calls: int = 0
    failures: list[CallFailure] = field(default_factory=list)


def best_of_n_decode(
    agent: Backend,
    reward: RewardFn,
    prompts: Sequence[str],
    n: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    stop: Sequence[str] | None = None,
    seed: int = 0,
) -> list[BestOfNOutput]:
    """Sample n completions per prompt and keep the one with the highest reward.

    Draw d is one batched `generate` call over the prompts with seed `seed + d`,
    so every backend (also an HTTP one, where a seed is per request) gives n
    different samples; each prompt is charged n model calls, as Collab is charged
    its calls, so the two compare at equal calls.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or (n > 1 and temperature == 0):
        raise ValueError(
            f"temperature: must be >= 0, and > 0 to draw n={n} > 1 different samples; "
            f"got {temperature}"
        )
    _check_inputs([agent], prompts)
    outputs = [BestOfNOutput(prompt=p) for p in prompts]
    for draw in range(n):
        for out in outputs:
            out.model_calls += 1
        draw_once = partial(
            agent.generate,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop=stop,
            seed=seed + draw,
        )
        try:
            texts = call_each(draw_once, list(prompts))
        except BackendError as e:  # the call failed as a whole: each prompt lost it
            for out in outputs:
                out.failures.append(_failure("generate", 0, draw, e))
            continue
        if len(texts) != len(prompts):
            raise ValueError(f"agent.generate returned {len(texts)} texts for {len(prompts)}")
        for out, text in zip(outputs, texts, strict=True):
            if isinstance(text, BackendError):  # this prompt's own malformed answer
                out.failures.append(_failure("generate", 0, draw, text))
            else:
                out.samples.append(text)
    pairs = [(out, s) for out in outputs for s in out.samples]
    scores = _rewards(reward, [o.prompt for o, _ in pairs], [s for _, s in pairs])
    for (out, _), score in zip(pairs, scores, strict=True):
        out.rewards.append(score)
        out.reward_calls += 1
    for out in outputs:
        if out.rewards:
            best = max(range(len(out.rewards)), key=out.rewards.__getitem__)
            out.completion, out.reward = out.samples[best], out.rewards[best]
    return outputs
