"""`synth/armap`: ARMAP triplets from agent trajectories, then a reward model trained
on them. Wiring only; the method is `flywheel.synthesis.armap`. The planner deployments
that use the reward model, `plan/best-of-n`, `plan/reflexion` and `plan/mcts`, are in
`flywheel.flows.plan`.

`environment` picks one of `ENVIRONMENTS` (`flywheel.flows.environments`), a fixed
registry of the environments implemented here (`shop`, the default, and `grid`); run
parameters never name code."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field, field_validator, model_validator

from flywheel.flows.environments import ENVIRONMENTS, AgentField, EnvironmentField, ShopSettings
from flywheel.flows.outputs import PlannedOutputs
from flywheel.flows.pair_training import default_backbone
from flywheel.flows.reward import RewardTrainParams, train_flow
from flywheel.flows.tracking import MODEL_CALLS, Deployment, FlowRun, model_inputs
from flywheel.llm import BackendSpec, make_backend, model_fingerprint
from flywheel.store import Checkpoint, DatasetRef, data_root, failed_name
from flywheel.store.models import model_name_for
from flywheel.store.naming import validate_output_name
from flywheel.synthesis import armap
from flywheel.synthesis.armap import ArmapConfig, LLMIntentProposer
from flywheel.synthesis.environment import Agent


class ArmapSynthParams(ArmapConfig, ShopSettings):
    """Parameters of `synth/armap`: ARMAP's knobs, the agent, and what to write."""

    # 600 intents (about 6,000 triplets): with 200 the reward model stayed near 0.55-0.74
    # held-out and MCTS gained little over the plain policy (benchmarks/README.md)
    intents: int = Field(600, ge=1, description="task intents to propose")
    environment: EnvironmentField = "shop"
    agent: AgentField
    proposer_backend: BackendSpec | None = Field(
        None, description="LLM that proposes intents (proposer='llm')"
    )
    output: str = Field("armap_triplets", description="name of the triplet dataset")
    train_reward_model: bool = Field(True, description="train `<output>-rm` on the triplets")
    reward_epochs: float = Field(2.0, gt=0)
    reward_base_model: str = Field(
        default_factory=default_backbone, description="backbone folder of the reward model"
    )

    @field_validator("output")
    @classmethod
    def _dataset_name(cls, name: str) -> str:
        # the run also writes <output>__failed, and trains the reward model <output>-rm
        validate_output_name(name, field="output", failed=True)
        model_name_for(name, "rm", field="output")
        return name

    @model_validator(mode="after")
    def _llm_proposer_needs_backend(self) -> ArmapSynthParams:
        if self.proposer == "llm" and self.proposer_backend is None:
            raise ValueError("proposer_backend: required when proposer is 'llm' (a BackendSpec)")
        return self

    def armap_config(self) -> ArmapConfig:
        return ArmapConfig.model_validate(self.model_dump(include=set(ArmapConfig.model_fields)))

    def proposer_spec(self) -> BackendSpec | None:
        """The LLM that proposes intents, None when the world proposes them."""
        return self.proposer_backend if self.proposer == "llm" else None


@task(name="check-inputs")
def check_armap_inputs(params: ArmapSynthParams) -> None:
    """Fail before any model loads: the agent's, proposer's and reward backbone's folders."""
    for spec in (params.agent, params.proposer_spec()):
        if spec is not None:
            spec.check()
    if params.train_reward_model and not Path(params.reward_base_model).expanduser().is_dir():
        raise FileNotFoundError(
            f"reward_base_model: no model folder at {params.reward_base_model}; run "
            "`prefect deployment run world/bootstrap` or pass a backbone folder"
        )


def _workdir(params: ArmapSynthParams) -> Path:
    models = [model_fingerprint(params.agent)]
    if params.proposer_backend is not None:
        models.append(model_fingerprint(params.proposer_backend))
    key = Checkpoint.key(
        params.armap_config().model_dump(mode="json"),
        params.environment,
        # the shop's catalog: another catalog is another synthesis (other environments
        # ignore these settings)
        params.model_dump(mode="json", include=set(ShopSettings.model_fields)),
        models,
        ENVIRONMENTS[params.environment].source_digest(),
    )
    return data_root() / "_work" / "armap" / key


@dataclass(frozen=True)
class Triplets:
    """What synthesize-triplets made: ARMAP's figures and the two datasets written."""

    figures: dict[str, Any]
    triplets: DatasetRef
    failed: DatasetRef
    reused_earlier_output: bool

    def result(self) -> dict[str, Any]:
        """The flow's result: the figures, each dataset as `name@version`, the reuse."""
        return {
            "figures": self.figures,
            "triplets": f"{self.triplets.name}@{self.triplets.version}",
            "failed": f"{self.failed.name}@{self.failed.version}",
            "reused_earlier_output": self.reused_earlier_output,
        }


@task(name="synthesize-triplets", **MODEL_CALLS)
def synthesize(params: ArmapSynthParams, run_id: str) -> Triplets:
    """Intents, trajectories, refined intents, triplets; checkpointed per chunk of intents,
    so a killed run resumes and a repeated run reuses its versions."""
    config, ckpt = params.armap_config(), Checkpoint(_workdir(params))
    environment = ENVIRONMENTS[params.environment].build(params)
    spec, proposer = params.proposer_spec(), None
    with ExitStack() as backends:  # the agent's, then the proposer's; closed in reverse
        backend = backends.enter_context(make_backend(params.agent))
        agent = Agent(backend, temperature=config.temperature, seed=config.seed)
        if spec is not None:
            proposer = LLMIntentProposer(backends.enter_context(make_backend(spec)))
        triplets, failures, figures = armap.synthesize_triplets(
            config, proposer, agent, ckpt, environment=environment
        )
    names = {"triplets": params.output, "failed": failed_name(params.output)}
    out = PlannedOutputs(ckpt, names, run_id)
    # the models the rows come from: the agent, and the proposer when an LLM proposes
    inputs = [ref for m in (params.agent, spec) if m is not None for ref in model_inputs(m)]
    written = out.write("triplets", armap.triplet_rows(triplets), inputs, armap.TRIPLET_SCHEMA)
    failed = out.write("failed", armap.failure_rows(failures), inputs, armap.FAILED_SCHEMA)
    return Triplets(figures, written, failed, out.reused)


def _train_reward_model(params: ArmapSynthParams, triplets: DatasetRef) -> dict:
    """`reward/train` on the triplets: `<output>-rm` on the reward backbone."""
    return train_flow(
        RewardTrainParams(
            dataset=triplets.name,
            dataset_version=triplets.version,
            model_name=model_name_for(params.output, "rm", field="output"),
            epochs=params.reward_epochs,
            base_model=params.reward_base_model,
            seed=params.seed,
        )
    )


ARMAP = Deployment("synth/armap", "ARMAP synthesis", ArmapSynthParams)


@ARMAP.flow
def armap_flow(params: ArmapSynthParams, run: FlowRun) -> dict:
    """ARMAP: intents, agent trajectories, refined intents, triplets, and a reward model."""
    check_armap_inputs(params)
    made = synthesize(params, run.id)
    out = made.result()
    figures = armap.summary_figures(made.figures)
    figures |= {"dataset: triplets": out["triplets"], "dataset: failed": out["failed"]}
    figures["environment"] = params.environment
    if params.train_reward_model and not made.figures["triplets"]:
        # nothing to learn from: say so instead of failing inside the trainer
        figures["reward model"] = (
            "not trained: no triplets (no trajectory fulfilled a task; the shop: "
            "the agent bought nothing)"
        )
    elif params.train_reward_model:
        trained = _train_reward_model(params, made.triplets)
        out["reward_model"] = trained["model"]
        figures["reward model"] = trained["figures"]["model"]
        figures["reward model held-out accuracy"] = trained["figures"]["eval pairwise accuracy"]
    run.summary(figures)
    return out | {"seconds": figures["seconds"]}
