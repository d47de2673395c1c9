"""`plan/best-of-n`, `plan/reflexion`, `plan/mcts`: ARMAP's planners with the reward model
`synth/armap` trains, each against the plain policy on the same held-out intents.
Wiring only; the method is `flywheel.synthesis.planners`, the environments
`flywheel.flows.environments`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel.flows.environments import ENVIRONMENTS, AgentField, EnvironmentField
from flywheel.flows.outputs import write_once
from flywheel.flows.tracking import MODEL_CALLS, Deployment, FlowRun, model_inputs
from flywheel.llm import make_backend
from flywheel.reward_models.bradley_terry import RewardModel
from flywheel.store import ModelRef, read_model
from flywheel.store.naming import new_version, validate_output_name
from flywheel.synthesis import planners
from flywheel.synthesis.environment import Agent


class PlanParams(BaseModel):
    """What every planner deployment shares: the agent, the reward model, the intents."""

    model_config = ConfigDict(extra="forbid")

    reward_model: str = Field(
        "armap-triplets-rm", description="registered reward model (`synth/armap` trains one)"
    )
    environment: EnvironmentField = "shop"
    agent: AgentField
    temperature: float = Field(1.0, ge=0)
    intents: int = Field(100, ge=1, description="held-out intents to plan for")
    seed: int = 0
    output: str | None = Field(None, description="dataset of executed plans; null: derived")

    @field_validator("output")
    @classmethod
    def _output_name(cls, name: str | None) -> str | None:
        return None if name is None else validate_output_name(name, field="output")


class BestOfNParams(PlanParams):
    n: int = Field(8, ge=1, description="sampled episodes per intent")


class ReflexionParams(PlanParams):
    trials: int = Field(3, ge=1, description="attempts per intent")
    threshold: float = Field(0.0, description="reward-model score that ends the retries")


class MCTSParams(PlanParams):
    simulations: int = Field(12, ge=1)
    c_uct: float = Field(1.0, gt=0)
    horizon: int = Field(10, ge=1)
    expand_k: int = Field(3, ge=1, description="actions sampled per expansion")


@task(name="check-inputs")
def check_plan_inputs(params: PlanParams) -> ModelRef:
    params.agent.check()
    return read_model(params.reward_model)


@dataclass(frozen=True)
class PlanOutcome:
    """The plain policy's and the planner's figures, and the executed plans' dataset."""

    plain: dict[str, Any]
    planner: dict[str, Any]
    dataset: str  # name@version


@task(name="plan", **MODEL_CALLS)
def run_planner(
    name: str, planner: planners.Planner, params: PlanParams, rm: ModelRef, run_id: str
) -> PlanOutcome:
    """The planner and the plain policy on the same held-out intents, same run."""
    environment, intents = ENVIRONMENTS[params.environment].held_out(params.intents)
    with make_backend(params.agent) as backend:
        agent = Agent(backend, temperature=params.temperature, seed=params.seed)
        baseline, planned, rows = planners.compare(
            planner, agent, RewardModel(rm.path), intents, environment, seed=params.seed
        )
    output = params.output or f"plan_{name.replace('-', '_')}"
    inputs: list[Any] = [rm, *model_inputs(params.agent)]
    ref, _ = write_once(output, rows, new_version(), run_id, inputs, planners.PLAN_SCHEMA)
    return PlanOutcome(baseline, planned, f"{ref.name}@{ref.version}")


def _plan(planner: planners.Planner, params: PlanParams, rm: ModelRef, run: FlowRun) -> dict:
    name = run.name.split("/", 1)[1]
    out = run_planner(name, planner, params, rm, run.id)
    figures = {
        "reward model": f"{rm.name}@{rm.version}",
        "environment": params.environment,
        **planners.comparison_figures(name, out.plain, out.planner),
        "dataset": out.dataset,
    }
    run.summary(figures)
    return asdict(out)


BEST_OF_N = Deployment("plan/best-of-n", "Planning with best-of-n", BestOfNParams)


@BEST_OF_N.flow(check=check_plan_inputs)
def best_of_n_flow(params: BestOfNParams, rm: ModelRef, run: FlowRun) -> dict:
    """Best-of-N with the ARMAP reward model vs the plain policy on held-out intents."""
    return _plan(planners.best_of_n(params.n), params, rm, run)


REFLEXION = Deployment("plan/reflexion", "Planning with reflexion", ReflexionParams)


@REFLEXION.flow(check=check_plan_inputs)
def reflexion_flow(params: ReflexionParams, rm: ModelRef, run: FlowRun) -> dict:
    """Reflexion (reward-model feedback for a retry) vs the plain policy."""
    return _plan(planners.reflexion(params.trials, params.threshold), params, rm, run)


MCTS = Deployment("plan/mcts", "Planning with mcts", MCTSParams)


@MCTS.flow(check=check_plan_inputs)
def mcts_flow(params: MCTSParams, rm: ModelRef, run: FlowRun) -> dict:
    """MCTS (UCT, agent rollouts, reward-model values) vs the plain policy."""
    planner = planners.mcts(params.simulations, params.c_uct, params.horizon, params.expand_k)
    return _plan(planner, params, rm, run)
