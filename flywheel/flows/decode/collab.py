"""`decode/collab`: agents propose tokens, a target reward's rollouts pick token and
agent; the method is `flywheel.decoders.collab`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
from prefect import task
from pydantic import Field, model_validator

from flywheel.decoders import collab as collab_module
from flywheel.decoders.collab import CollabConfig, collab_decode
from flywheel.flows.decode.common import (
    WORLD_REWARD,
    DecodeParams,
    TargetReward,
    accuracy,
    check_fits,
    code_hash,
    common_fields,
    correct,
    decode_rows,
    figure,
    large_model,
    output_rows,
    prompt_rows,
    read_reward_model,
    share,
    work_key,
    write_output,
)
from flywheel.flows.reward import default_backbone
from flywheel.flows.tracking import (
    MODEL_CALLS,
    Deployment,
    length_figures,
    model_inputs,
)
from flywheel.llm import BackendSpec, make_backend, model_fingerprint
from flywheel.llm.base import call_each
from flywheel.store import (
    DatasetRef,
)
from flywheel.world.tasks import MAX_LEN

log = logging.getLogger(__name__)


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


# --- decode/collab ---

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


def _agent_names(agents: list[BackendSpec]) -> list[str]:
    """Readable, distinct agent names: the model folder's name, numbered when repeated."""
    names = [Path(a.model).name or a.model for a in agents]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@task(name="check-inputs")
def check_collab_inputs(params: CollabParams) -> dict:
    """Before any weights load: agents, the reward model, the prompts (with answers when
    the reward is the world's checker)."""
    for i, agent in enumerate(params.agents):
        try:
            agent.check()
        except Exception as err:
            raise type(err)(f"agents[{i}]: {err}") from err
    # the first agent that is a local folder gives the chat template
    local = [a.model for a in params.agents if Path(a.model).expanduser().is_dir()]
    prompts, rows = prompt_rows(params, local[0] if local else None)
    local_agents = {f"agents[{i}]": a.model for i, a in enumerate(params.agents)}
    # Collab's rollouts run up to rollout_len past each proposed token as well
    check_fits(rows, params.max_new_tokens + params.rollout_len, local_agents)
    reward = None
    if params.reward_model == WORLD_REWARD:
        if any(r["answer"] is None for r in rows):
            raise ValueError(
                f"reward_model {WORLD_REWARD!r} scores against the answer column, and "
                f"{prompts.name} has no {params.answer_column!r} values for every row; "
                "name a reward model trained with reward/train instead"
            )
    else:
        reward = read_reward_model(params.reward_model, params.reward_version, "reward_model")
    return {"prompts": prompts, "rows": rows, "reward": reward}


@task(name="decode-collab", **MODEL_CALLS)
def decode_collab(params: CollabParams, data: dict, run_id: str) -> tuple[DatasetRef, bool, dict]:
    names = _agent_names(params.agents)
    reward = TargetReward(data["reward"], data["rows"])
    agents = [make_backend(spec) for spec in params.agents]

    def decode_chunk(chunk: list[dict]) -> list[dict]:
        outs = collab_decode(agents, reward, [r["prompt"] for r in chunk], params.config())
        return [
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "completion": None if out.finish_reason == "failed" else out.completion,
                "answer": r["answer"],
                "correct": correct(r, None if out.finish_reason == "failed" else out.completion),
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
            for r, out in zip(chunk, outs, strict=True)
        ]

    reward_key = (
        "world" if data["reward"] is None else f"{data['reward'].name}@{data['reward'].version}"
    )
    key = [
        [model_fingerprint(s) for s in params.agents],
        reward_key,
        params.config().model_dump(mode="json"),
        COLLAB_SOURCE,
        work_key(params, data),
    ]
    try:
        rows, ckpt = decode_rows("collab", key, data["rows"], decode_chunk, params.batch_size)
    finally:
        for agent in agents:
            agent.close()
    inputs = [
        data["prompts"],
        *([data["reward"]] if data["reward"] is not None else []),
        *(ref for s in params.agents for ref in model_inputs(s)),
    ]
    return (*write_output(params, ckpt, rows, COLLAB_SCHEMA, run_id, inputs), reward.length())


@task(name="agents-alone", **MODEL_CALLS)
def agents_alone(params: CollabParams, data: dict) -> dict[str, dict]:
    """Each agent's greedy completion, scored by the same target reward. A malformed
    answer counts as wrong, is left out of the mean reward, and is counted and logged
    with its raw text."""
    reward = TargetReward(data["reward"], data["rows"])
    prompts = [r["prompt"] for r in data["rows"]]
    # each agent alone reads the prompts as given, in its own prompt format
    given = [r.get("source", r["prompt"]) for r in data["rows"]]
    out = {}
    for name, spec in zip(_agent_names(params.agents), params.agents, strict=True):
        with make_backend(spec) as agent:
            answers = call_each(
                lambda batch, agent=agent: agent.generate(
                    batch, max_new_tokens=params.max_new_tokens, temperature=0.0, stop=params.stop
                ),
                given,
            )
        texts = [a if isinstance(a, str) else None for a in answers]
        answered = [i for i, t in enumerate(texts) if t is not None]
        for i in (i for i, t in enumerate(texts) if t is None):
            log.warning("%s alone, prompt %d: %s; raw: %.500r", name, i, answers[i], answers[i].raw)
        scores = reward([prompts[i] for i in answered], [texts[i] for i in answered])
        out[name] = {
            "mean reward": sum(scores) / len(scores) if scores else None,
            "accuracy": accuracy(data["rows"], texts),
            "failed calls": len(prompts) - len(answered),
        }
    return out


COLLAB_FLOW_DEFAULTS = CollabParams()
COLLAB = Deployment("decode/collab", "Collab decoding", nightly_utc="30 6 * * *")


@COLLAB.flow
def collab_flow(params: CollabParams = COLLAB_FLOW_DEFAULTS) -> dict:
    """Collab: agents propose tokens, a target reward's rollouts pick token and agent."""
    with COLLAB.run(params) as run:
        data = check_collab_inputs(params)
        output, reused, length = decode_collab(params, data, run.id)
        rows = output_rows(output)
        scored = [r["reward"] for r in rows if r["reward"] is not None]
        figures = {
            "output": f"{output.name}@{output.version}",
            "reused earlier output": reused,
            "prompts": len(rows),
            "target reward": params.reward_model,
            "mean target reward": sum(scored) / len(scored) if scored else "n/a (all failed)",
            "accuracy": figure(accuracy(rows, [r["completion"] for r in rows])),
            "model calls per prompt": sum(r["model_calls"] for r in rows) / len(rows),
            "agent switches per prompt": sum(r["switches"] for r in rows) / len(rows),
            "prompts failed": sum(r["finish_reason"] == "failed" for r in rows),
            "failed model calls": sum(r["failed_calls"] for r in rows),
            **length_figures(length),
        }
        for name in _agent_names(params.agents):
            figures[f"share of tokens by {name}"] = share(rows, name)
        if params.baselines:
            for name, alone in agents_alone(params, data).items():
                figures[f"{name} alone: mean target reward"] = figure(alone["mean reward"])
                figures[f"{name} alone: accuracy"] = figure(alone["accuracy"])
                figures[f"{name} alone: failed calls"] = alone["failed calls"]
        run.summary(figures)
        return {"figures": figures}
