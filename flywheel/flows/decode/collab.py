"""`decode/collab`: agents propose tokens, a target reward's rollouts pick token and
agent; the method is `flywheel.decoders.collab`."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
from prefect import task
from pydantic import Field, model_validator

from flywheel.decoders import collab as collab_module
from flywheel.decoders.collab import CollabConfig, collab_decode
from flywheel.decoders.evaluation import AloneScore, agent_alone, correct
from flywheel.flows.decode.common import (
    WORLD_REWARD,
    DecodeInputs,
    DecodeParams,
    Written,
    common_fields,
    decode_and_write,
    figure,
    large_model,
    output_accuracy,
    writer_share,
)
from flywheel.flows.decode.inputs import LocalModel, read_prompts
from flywheel.flows.decode.rewards import TargetReward, read_reward_model
from flywheel.flows.pair_training import code_hash, default_backbone
from flywheel.flows.tracking import MODEL_CALLS, Deployment, FlowRun, length_figures, model_inputs
from flywheel.llm import BackendSpec, make_backend, model_fingerprint
from flywheel.store import ModelRef
from flywheel.world.tasks import MAX_LEN


def _world_agents() -> list[BackendSpec]:
    return [
        BackendSpec(model=default_backbone(), batch_size=64),
        BackendSpec(model=large_model(), batch_size=64),
    ]


class CollabParams(DecodeParams, CollabConfig):
    """Parameters of `decode/collab`: Collab's own (`CollabConfig`: k, rollout_len, alpha,
    stop, eos_tokens) and the decoders' common ones, plus the agents and the reward."""

    agents: list[BackendSpec] = Field(
        default_factory=_world_agents, min_length=1, description="the agent policies"
    )
    reward_model: str = Field(
        "world-preference-pairs-rm",
        description=f"registered reward model (from reward/train) as the target reward; "
        f"{WORLD_REWARD!r}: the world's checker against the answer column",
    )
    reward_version: str | None = Field(None, description="null: the latest version")
    # the world's answers are a few tokens long: fewer candidates and a rollout as long as
    # an answer, instead of the method's defaults (5 and 16)
    k: int = Field(3, ge=1, description="tokens each agent proposes per step")
    rollout_len: int = Field(MAX_LEN + 2, ge=0, description="greedy tokens to estimate Q")

    @model_validator(mode="after")
    def _check(self) -> CollabParams:
        self.output = self.output or "decoded_collab"
        return self

    def config(self) -> CollabConfig:
        return CollabConfig.model_validate(self.model_dump(include=set(CollabConfig.model_fields)))


COLLAB_SOURCE = code_hash(collab_module)
COLLAB_SCHEMA = pa.schema(
    [
        *common_fields(),
        ("tokens", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("reward", pa.float64()),
        ("model_calls", pa.int64()),
        ("reward_calls", pa.int64()),
        ("switches", pa.int64()),
        ("failed_calls", pa.int64()),
        ("failures", pa.string()),  # JSON: stage, agent, step, error and the raw response
    ]
)


@dataclass(frozen=True)
class CollabInputs(DecodeInputs):
    """The prompts and the target reward model (None: the world's checker)."""

    reward: ModelRef | None


def _agent_names(agents: list[BackendSpec]) -> list[str]:
    """Readable, distinct agent names: the model folder's name, numbered when repeated."""
    names = [Path(a.model).name or a.model for a in agents]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@task(name="check-inputs")
def check_collab_inputs(params: CollabParams) -> CollabInputs:
    """Before any weights load: agents, the reward model, the prompts (with answers when
    the reward is the world's checker)."""
    for i, agent in enumerate(params.agents):
        try:
            agent.check()
        except Exception as err:
            raise type(err)(f"agents[{i}]: {err}") from err
    local = [
        LocalModel.load(f"agents[{i}]", a.model)
        for i, a in enumerate(params.agents)
        if Path(a.model).expanduser().is_dir()
    ]
    # the first local agent gives the chat template; rollouts run up to rollout_len past
    # each proposed token as well
    data = read_prompts(params, local, rollout=params.rollout_len)
    reward = None
    if params.reward_model == WORLD_REWARD:
        if any(r["answer"] is None for r in data.rows):
            raise ValueError(
                f"reward_model {WORLD_REWARD!r} scores against the answer column, and "
                f"{data.prompts.name} has no {params.answer_column!r} values for every row; "
                "name a reward model trained with reward/train instead"
            )
    else:
        reward = read_reward_model(params.reward_model, params.reward_version, "reward_model")
    return CollabInputs(data.prompts, data.rows, reward)


@task(name="decode-collab", **MODEL_CALLS)
def decode_collab(params: CollabParams, data: CollabInputs, run_id: str) -> Written:
    names = _agent_names(params.agents)
    reward = TargetReward(data.reward, data.rows)
    agents = [make_backend(spec) for spec in params.agents]

    def decode_chunk(chunk: list[dict]) -> list[dict]:
        outs = collab_decode(agents, reward, [r["prompt"] for r in chunk], params.config())
        rows = []
        for r, out in zip(chunk, outs, strict=True):
            completion = None if out.finish_reason == "failed" else out.completion
            rows.append(
                {
                    "id": r["id"],
                    "prompt": r["prompt"],
                    "completion": completion,
                    "answer": r["answer"],
                    "correct": correct(r["answer"], completion),
                    "writers": [names[a] for a in out.agents],
                    "tokens": out.tokens,
                    "finish_reason": out.finish_reason,
                    "reward": out.reward,
                    "model_calls": out.model_calls,
                    "reward_calls": out.reward_calls,
                    "switches": out.switches,
                    "failed_calls": len(out.failures),
                    "failures": json.dumps([f.__dict__ for f in out.failures]),
                }
            )
        return rows

    reward_key = "world" if data.reward is None else f"{data.reward.name}@{data.reward.version}"
    key = [
        [model_fingerprint(s) for s in params.agents],
        reward_key,
        params.config().model_dump(mode="json"),
        COLLAB_SOURCE,
    ]
    lineage = [
        *([data.reward] if data.reward is not None else []),
        *(ref for s in params.agents for ref in model_inputs(s)),
    ]
    try:
        written = decode_and_write(
            params,
            data,
            run_id,
            method="collab",
            key=key,
            decode_chunk=decode_chunk,
            schema=COLLAB_SCHEMA,
            lineage=lineage,
        )
    finally:
        for agent in agents:
            agent.close()
    return replace(written, length=reward.length())


@task(name="agents-alone", **MODEL_CALLS)
def agents_alone(params: CollabParams, data: CollabInputs) -> dict[str, AloneScore]:
    """Each agent's greedy completion, scored by the same target reward."""
    reward = TargetReward(data.reward, data.rows)
    prompts = [r["prompt"] for r in data.rows]
    given = [r["source"] for r in data.rows]  # each agent renders them in its own format
    answers = [r["answer"] for r in data.rows]
    scores = {}
    for name, spec in zip(_agent_names(params.agents), params.agents, strict=True):
        with make_backend(spec) as agent:
            scores[name] = agent_alone(
                agent,
                name,
                prompts,
                given,
                answers,
                reward,
                max_new_tokens=params.max_new_tokens,
                stop=params.stop,
            )
    return scores


COLLAB = Deployment("decode/collab", "Collab decoding", CollabParams)


@COLLAB.flow(check=check_collab_inputs)
def collab_flow(params: CollabParams, data: CollabInputs, run: FlowRun) -> dict:
    """Collab: agents propose tokens, a target reward's rollouts pick token and agent."""
    written = decode_collab(params, data, run.id)
    rows = written.rows()
    scored = [r["reward"] for r in rows if r["reward"] is not None]
    figures = {
        **written.figures(rows),
        "target reward": params.reward_model,
        "mean target reward": sum(scored) / len(scored) if scored else "n/a (all failed)",
        "accuracy": output_accuracy(rows),
        "model calls per prompt": sum(r["model_calls"] for r in rows) / len(rows),
        "agent switches per prompt": sum(r["switches"] for r in rows) / len(rows),
        "prompts failed": sum(r["finish_reason"] == "failed" for r in rows),
        "failed model calls": sum(r["failed_calls"] for r in rows),
        **length_figures(written.length),
    }
    for name in _agent_names(params.agents):
        figures[f"share of tokens by {name}"] = writer_share(rows, name)
    if params.baselines:
        for name, alone in agents_alone(params, data).items():
            figures[f"{name} alone: mean target reward"] = figure(alone.mean_reward)
            figures[f"{name} alone: accuracy"] = figure(alone.accuracy)
            figures[f"{name} alone: failed calls"] = alone.failed_calls
    run.summary(figures)
    return {"figures": figures}
