"""`synth/armap` (ARMAP triplets, then a reward model trained on them) and the planner
deployments `plan/best-of-n`, `plan/reflexion`, `plan/mcts`. Wiring only; the methods
are `flywheel.synthesis.armap` and `flywheel.synthesis.planners`.

`environment` picks one of `ENVIRONMENTS`, a fixed registry of the environments
implemented here (`shop`, the default, and `grid`); run parameters never name code."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel.environments import grid
from flywheel.flows.reward import RewardTrainParams, default_backbone, train_flow
from flywheel.flows.tracking import MODEL_CALLS, Deployment, model_inputs, write_once
from flywheel.llm import BackendSpec, make_backend, model_fingerprint
from flywheel.reward_models.bradley_terry import RewardModel
from flywheel.store import Checkpoint, ModelRef, data_root, failed_name, read_model
from flywheel.store.datasets import new_version, validate_output_name
from flywheel.store.models import model_name_for
from flywheel.synthesis import armap, planners
from flywheel.synthesis.armap import ArmapConfig, EnvironmentEntry, LLMIntentProposer
from flywheel.synthesis.environment import Agent
from flywheel.world import shop_agent, shop_env
from flywheel.world.bootstrap import models_root, shop_agent_dir

ENVIRONMENTS: dict[str, EnvironmentEntry] = {
    "shop": EnvironmentEntry(
        build=lambda c: shop_env.ShopEnvironment.from_settings(
            c.catalog_size, c.catalog_seed, c.price_slack
        ),
        held_out=shop_env.held_out_tasks,
        modules=(shop_env, shop_agent),
    ),
    "grid": EnvironmentEntry(
        build=lambda c: grid.GridEnvironment(),
        held_out=grid.held_out_tasks,
        modules=(grid,),
    ),
}
EnvironmentName = Literal["shop", "grid"]


def _shop_agent_spec() -> BackendSpec:
    return BackendSpec(model=str(shop_agent_dir(models_root())))


class ArmapSynthParams(ArmapConfig):
    """Parameters of `synth/armap`: ARMAP's knobs, the agent, and what to write."""

    # 600 intents (about 6,000 triplets): with 200 the reward model stayed near 0.55-0.74
    # held-out and MCTS gained little over the plain policy (benchmarks/README.md)
    intents: int = Field(600, ge=1, description="task intents to propose")
    environment: EnvironmentName = Field(
        "shop", description="where the agent acts: 'shop' (the built-in world) or 'grid'"
    )
    agent: BackendSpec = Field(
        default_factory=_shop_agent_spec,
        description="the acting LLM (the default is the shop agent: give one for 'grid')",
    )
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


@task(name="check-inputs")
def check_armap_inputs(params: ArmapSynthParams) -> None:
    """Fail before any model loads: the agent's, proposer's and reward backbone's folders."""
    params.agent.check()
    if params.proposer == "llm":
        if params.proposer_backend is None:
            raise ValueError("proposer_backend: required when proposer is 'llm' (a BackendSpec)")
        params.proposer_backend.check()
    if params.train_reward_model and not Path(params.reward_base_model).expanduser().is_dir():
        raise FileNotFoundError(
            f"reward_base_model: no model folder at {params.reward_base_model}; run "
            "`prefect deployment run world/bootstrap` or pass a backbone folder"
        )


def _workdir(params: ArmapSynthParams) -> Path:
    config = ArmapConfig.model_validate(params.model_dump(include=set(ArmapConfig.model_fields)))
    models = [model_fingerprint(params.agent)]
    if params.proposer_backend is not None:
        models.append(model_fingerprint(params.proposer_backend))
    key = Checkpoint.key(
        config.model_dump(mode="json"),
        params.environment,
        models,
        ENVIRONMENTS[params.environment].source_digest(),
    )
    return data_root() / "_work" / "armap" / key


@task(name="synthesize-triplets", **MODEL_CALLS)
def synthesize(params: ArmapSynthParams, run_id: str) -> dict:
    """Intents, trajectories, refined intents, triplets; checkpointed per chunk of intents,
    so a killed run resumes and a repeated run reuses its versions."""
    config = ArmapConfig.model_validate(params.model_dump(include=set(ArmapConfig.model_fields)))
    ckpt = Checkpoint(_workdir(params))
    environment = ENVIRONMENTS[params.environment].build(config)
    with make_backend(params.agent) as backend:
        agent = Agent(backend, temperature=config.temperature, seed=config.seed)
        proposer = None
        if config.proposer == "llm":
            assert params.proposer_backend is not None  # checked in check-inputs
            proposer_backend = make_backend(params.proposer_backend)
            proposer = LLMIntentProposer(proposer_backend)
        try:
            triplets, failures, figures = armap.synthesize_triplets(
                config, proposer, agent, ckpt, environment=environment
            )
        finally:
            if config.proposer == "llm":
                proposer_backend.close()
    names = {"triplets": params.output, "failed": failed_name(params.output)}
    planned = ckpt.put_once("versions", {k: new_version() for k in names})
    inputs = model_inputs(params.agent)
    rows = {"triplets": armap.triplet_rows(triplets), "failed": armap.failure_rows(failures)}
    schemas = {"triplets": armap.TRIPLET_SCHEMA, "failed": armap.FAILED_SCHEMA}
    (written, reused), (failed, _) = (
        write_once(names[k], rows[k], planned[k], run_id, inputs, schemas[k]) for k in names
    )
    return {
        "figures": figures,
        "triplets": f"{written.name}@{written.version}",
        "failed": f"{failed.name}@{failed.version}",
        "reused_earlier_output": reused,
    }


ARMAP_DEFAULTS = ArmapSynthParams()
ARMAP = Deployment("synth/armap", "ARMAP synthesis", nightly_utc="30 2 * * *")


@ARMAP.flow
def armap_flow(params: ArmapSynthParams = ARMAP_DEFAULTS) -> dict:
    """ARMAP: intents, agent trajectories, refined intents, triplets, and a reward model."""
    with ARMAP.run(params) as run:
        check_armap_inputs(params)
        out = synthesize(params, run.id)
        figures = armap.summary_figures(out["figures"])
        figures |= {"dataset: triplets": out["triplets"], "dataset: failed": out["failed"]}
        figures["environment"] = params.environment
        if params.train_reward_model and not out["figures"]["triplets"]:
            # nothing to learn from: say so instead of failing inside the trainer
            figures["reward model"] = (
                "not trained: no triplets (no trajectory fulfilled a task; the shop: "
                "the agent bought nothing)"
            )
        elif params.train_reward_model:
            trained = train_flow(
                RewardTrainParams(
                    dataset=params.output,
                    dataset_version=out["triplets"].split("@", 1)[1],
                    model_name=model_name_for(params.output, "rm", field="output"),
                    epochs=params.reward_epochs,
                    base_model=params.reward_base_model,
                    seed=params.seed,
                )
            )
            out["reward_model"] = trained["model"]
            figures["reward model"] = trained["figures"]["model"]
            figures["reward model held-out accuracy"] = trained["figures"]["eval pairwise accuracy"]
        run.summary(figures)
        return out | {"seconds": figures["seconds"]}


# --- planners ---


class PlanParams(BaseModel):
    """What every planner deployment shares: the agent, the reward model, the intents."""

    model_config = ConfigDict(extra="forbid")

    reward_model: str = Field(
        "armap-triplets-rm", description="registered reward model (`synth/armap` trains one)"
    )
    environment: EnvironmentName = Field(
        "shop", description="where the agent acts: 'shop' (the built-in world) or 'grid'"
    )
    agent: BackendSpec = Field(
        default_factory=_shop_agent_spec,
        description="the acting LLM (the default is the shop agent: give one for 'grid')",
    )
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


@task(name="plan", **MODEL_CALLS)
def run_planner(
    name: str, planner: planners.Planner, params: PlanParams, rm: ModelRef, run_id: str
) -> dict:
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
    return {"plain": baseline, "planner": planned, "dataset": f"{ref.name}@{ref.version}"}


def _plan(deployment: Deployment, planner: planners.Planner, params: PlanParams) -> dict:
    name = deployment.name.split("/", 1)[1]
    with deployment.run(params) as run:
        rm = check_plan_inputs(params)
        out = run_planner(name, planner, params, rm, run.id)
        figures = {
            "reward model": f"{rm.name}@{rm.version}",
            "environment": params.environment,
            **planners.comparison_figures(name, out["plain"], out["planner"]),
            "dataset": out["dataset"],
        }
        run.summary(figures)
        return out


BEST_OF_N_DEFAULTS = BestOfNParams()
BEST_OF_N = Deployment("plan/best-of-n", "Planning with best-of-n", nightly_utc="0 4 * * *")


@BEST_OF_N.flow
def best_of_n_flow(params: BestOfNParams = BEST_OF_N_DEFAULTS) -> dict:
    """Best-of-N with the ARMAP reward model vs the plain policy on held-out intents."""
    return _plan(BEST_OF_N, planners.best_of_n(params.n), params)


REFLEXION_DEFAULTS = ReflexionParams()
REFLEXION = Deployment("plan/reflexion", "Planning with reflexion", nightly_utc="15 4 * * *")


@REFLEXION.flow
def reflexion_flow(params: ReflexionParams = REFLEXION_DEFAULTS) -> dict:
    """Reflexion (reward-model feedback for a retry) vs the plain policy."""
    return _plan(REFLEXION, planners.reflexion(params.trials, params.threshold), params)


MCTS_DEFAULTS = MCTSParams()
MCTS = Deployment("plan/mcts", "Planning with mcts", nightly_utc="30 4 * * *")


@MCTS.flow
def mcts_flow(params: MCTSParams = MCTS_DEFAULTS) -> dict:
    """MCTS (UCT, agent rollouts, reward-model values) vs the plain policy."""
    planner = planners.mcts(params.simulations, params.c_uct, params.horizon, params.expand_k)
    return _plan(MCTS, planner, params)
