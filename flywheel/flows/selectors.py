"""`selectors/kmeans`: one LoRA adapter per task of a tasks dataset (a store dataset with
prompt, answer and task columns; by default the world's task families), a selector
trained on the samples nearest k-means centres, evaluated on held-out rows against
random selection at equal samples and against the base model and one multi-task
adapter; or, with `add`/`remove`, one adapter added to or removed from the latest
selector by updating the selector only. Wiring only; the method is `flywheel.selectors`,
the world's tasks (its families, its checker) `flywheel.world.selector_tasks`."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from flywheel.flows.tracking import Deployment, model_inputs, reuse_or_write
from flywheel.llm import BackendSpec
from flywheel.selectors import AdapterLibrary, AdaptersSelector, LoraTraining, SelectorConfig
from flywheel.selectors import evaluation as ev
from flywheel.selectors import selector_versions as versions
from flywheel.selectors.library_version import library_builder
from flywheel.selectors.tasks import DatasetTasks, TasksLayout, TaskSource, task_pairs, task_prompts
from flywheel.store import DatasetRef, ModelRef, data_root, save_model_version, write_dataset
from flywheel.world.bootstrap import model_dir, models_root
from flywheel.world.selector_tasks import WORLD, WorldTasks

LIBRARY_MODEL = "kmeans-adapters"
SELECTOR_MODEL = "kmeans-selector"
TASKS_DATASET = "selector_tasks"
SAMPLES_DATASET = "selector_samples"
EVAL_DATASET = "selector_eval"


def default_base_model() -> str:
    return str(model_dir(models_root(), "small"))


class KmeansSelectorParams(BaseModel):
    """Parameters of `selectors/kmeans`."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default_factory=default_base_model, description="base model folder")
    tasks_dataset: str | None = Field(
        None,
        description="store dataset of (prompt, answer, task) rows: one adapter per task value; "
        "null: the world's task families",
    )
    tasks_dataset_version: str | None = Field(None, description="null: the latest version")
    prompt_column: str = Field("prompt", description="tasks_dataset's prompt column")
    answer_column: str = Field("answer", description="tasks_dataset's reference answer column")
    task_column: str = Field("task", description="tasks_dataset's column naming each row's task")
    tasks: list[str] | None = Field(
        None, description="the task values to train adapters for (world: family names); null: all"
    )
    families: list[str] | None = Field(
        None, description="world task families (the world's `tasks`); null: all"
    )
    samples_per_task: int = Field(1000, ge=1, description="world task data per family")
    eval_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of each task's rows held out for evaluation "
        "(tasks_dataset; the world evaluates on eval_tasks fresh held-out tasks)",
    )
    k: int = Field(4, ge=1, description="k-means centres per task")
    per_centre: int = Field(2, ge=1, description="selector samples nearest each centre")
    distance: Literal["euclidean", "cosine"] = "euclidean"
    selector: Literal["lora", "head", "both"] = "both"
    adapter_rank: int = Field(8, ge=1)
    adapter_steps: int = Field(300, ge=1)
    adapter_lr: float = Field(1e-2, gt=0)
    target_modules: list[str] | None = Field(
        None,
        description="LoRA target module names (adapters and the LoRA selector); null: found "
        "for the architecture (q/k/v/o and MLP projections, GPT-2's c_attn/c_proj/c_fc)",
    )
    selector_rank: int = Field(4, ge=1)
    selector_steps: int = Field(150, ge=1, description="LoRA selector steps (head: epochs 300)")
    old_share: float = Field(0.3, ge=0, le=1, description="old samples replayed on add")
    eval_tasks: int = Field(600, ge=1, description="held-out world tasks (all families)")
    scorer: Literal["exact_match", "rouge_l", "reward_model"] = Field(
        "exact_match",
        description="how outputs are scored against the answer: exact match (the world: its "
        "checker), ROUGE-L F1, or a registered reward model's score (scorer_reward_model)",
    )
    scorer_reward_model: str | None = Field(
        None, description="registered reward model (scorer 'reward_model')"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="generation length; null: the longest answer's tokens + 2"
    )
    multitask_baseline: bool = Field(
        True, description="train one adapter on all tasks' data with the same total steps"
    )
    seed: int = 0
    add: str | None = Field(
        None, description="a task value (world: family) to add to the latest selector"
    )
    remove: str | None = Field(None, description="an adapter to remove from the latest selector")

    def task_source(self) -> TaskSource:
        """The tasks: the dataset's, or the world's families (recorded as `world`)."""
        if self.tasks_dataset is None:
            return WorldTasks(self.families, self.samples_per_task, self.eval_tasks, self.seed)
        columns = (self.prompt_column, self.answer_column, self.task_column)
        layout = TasksLayout(*columns, eval_fraction=self.eval_fraction, seed=self.seed)
        return DatasetTasks(self.tasks_dataset, self.tasks_dataset_version, layout)

    def adapter_training(self, steps: int | None = None) -> LoraTraining:
        return LoraTraining(
            rank=self.adapter_rank,
            steps=steps or self.adapter_steps,
            lr=self.adapter_lr,
            seed=self.seed,
            target_modules=self.target_modules,
        )

    def selector_config(self) -> SelectorConfig:
        same = self.model_dump(include={"k", "per_centre", "distance", "old_share", "seed"})
        rank, steps, modules = self.selector_rank, self.selector_steps, self.target_modules
        return SelectorConfig(**same, rank=rank, steps=steps, target_modules=modules)


@task(name="check-inputs")
def check_inputs(params: KmeansSelectorParams) -> dict:
    """Fail before anything is trained: the base folder, the tasks (the dataset's columns
    and task values, or the world's families), k and per_centre against the data size, the
    scorer, and for add/remove the latest selector and the name."""
    if not (Path(params.base_model).expanduser() / "config.json").exists():
        raise FileNotFoundError(
            f"base_model: no model folder at {params.base_model}; run `prefect deployment run "
            "world/bootstrap` for the world models, or pass a base model folder"
        )
    if params.add and params.remove:
        raise ValueError("add, remove: give one of them per run, not both")
    if params.tasks_dataset is not None and params.families is not None:
        raise ValueError(
            "families: names world task families; with a tasks_dataset, give `tasks` (which "
            "values of the task column to train adapters for)"
        )
    source, need = params.task_source(), params.k * params.per_centre
    dataset, tasks = source.choose(params.tasks, params.add, params.remove, need)
    ev.check_scorer(params.scorer, params.scorer_reward_model)
    models = (SELECTOR_MODEL, LIBRARY_MODEL, WORLD)
    update = versions.update_plan(params.add, params.remove, source.name, *models)
    return {"mode": "train", "dataset": dataset, "tasks": tasks, **update}


@task(name="task-data")
def task_data(params: KmeansSelectorParams, plan: dict) -> DatasetRef:
    """The tasks dataset: the user's as read in check-inputs, or the world's families'
    (prompt, answer, task) rows written once per setting."""
    if plan["dataset"] is not None:
        return plan["dataset"]
    source, names = params.task_source(), plan["tasks"]
    producer = f"world-tasks:seed{params.seed}_n{params.samples_per_task}_{'-'.join(names)}"
    return reuse_or_write(TASKS_DATASET, producer, partial(source.rows, names))


@task(name="train-adapters")
def train_adapters(
    params: KmeansSelectorParams, plan: dict, tasks: DatasetRef, run: str
) -> ModelRef:
    """A library version: an adapter per new task (reused when one was trained before with
    the same data, settings, base and code), the previous library's adapters copied
    byte-identically on add, and the multi-task baseline on a fresh run."""
    data, _ = task_pairs(tasks, params.task_source().layout, plan["tasks"])
    previous = plan["library"].path if plan["mode"] == "add" else None
    multi = plan["mode"] == "train" and params.multitask_baseline
    # the multi-task baseline: as many steps as the adapters together
    multitask = params.adapter_training(params.adapter_steps * len(data)) if multi else None
    training = params.adapter_training()
    build = library_builder(LIBRARY_MODEL, params.base_model, data, training, previous, multitask)
    inputs = [*model_inputs(BackendSpec(model=params.base_model)), tasks]
    kind = "lora-adapter-library"
    return save_model_version(LIBRARY_MODEL, build, kind=kind, produced_by=run, inputs=inputs)


def _workdir(run_id: str) -> Path:
    return data_root() / "_work" / "selectors" / run_id


@task(name="train-selectors")
def train_selectors(
    params: KmeansSelectorParams, plan: dict, tasks: DatasetRef | None, library: ModelRef, run: str
) -> dict:
    """Fresh run: k-means and random selectors of each kind on the same selection.
    add/remove: the latest selectors updated. Saved under the run's work folder; the
    selected samples written as a dataset."""
    adapters, layout, work = (
        AdapterLibrary(library.path),
        params.task_source().layout,
        _workdir(run),
    )
    prompts = {} if tasks is None else task_prompts(tasks, layout, plan["tasks"])
    if plan["mode"] == "train":
        kinds = ["lora", "head"] if params.selector == "both" else [params.selector]
        config = params.selector_config()
        trained = versions.train_fresh(adapters, prompts, config, kinds, work, layout.label)
    else:
        previous, kinds = plan["selector"].path, plan["names"]
        trained = versions.update_selectors(
            previous, kinds, adapters, work, layout.label, params.add, prompts, params.remove
        )
    saved, stats, rows = trained
    # remove: the samples come from the previous selector, no task data is read
    source = [tasks] if tasks is not None else [plan["selector"]]
    samples = write_dataset(SAMPLES_DATASET, rows, produced_by=run, inputs=source)
    return {"saved": saved, "stats": stats, "samples": samples}


@task(name="evaluate")
def evaluate(
    params: KmeansSelectorParams, plan: dict, library: ModelRef, selectors: dict, run: str
) -> dict:
    """Routing accuracy (k-means vs random) and the scorer's task score (routed adapters
    vs the base model, the multi-task adapter and oracle routing) on held-out rows."""
    adapters, source = AdapterLibrary(library.path), params.task_source()
    systems = {k: AdaptersSelector.load(path, adapters) for k, path in selectors["saved"].items()}
    data, exact = source.held_out(plan["dataset"], next(iter(systems.values())).names)
    if exact is None or params.scorer != "exact_match":  # the world: exact match is its checker
        exact = ev.named_scorer(params.scorer, params.scorer_reward_model)
    max_new = params.max_new_tokens or source.max_new_tokens(adapters.base_model, data)
    before = None
    if plan["mode"] == "add":  # also the old tasks routed by the selector before the add
        before = (plan["selector"].path, plan["library"].path, plan["names"])
    figures, rows = ev.evaluate_run(
        systems, data, exact, max_new, source.layout.label, before=before, added=params.add
    )
    ref = write_dataset(EVAL_DATASET, rows, produced_by=run, inputs=[selectors["samples"], library])
    figures["dataset"] = f"{ref.name}@{ref.version}"
    figures["eval_tasks"] = len(data.prompts)
    figures["scorer"] = params.scorer_reward_model or params.scorer
    figures["tasks_dataset"] = source.name
    return figures


@task(name="publish-selector")
def publish_selector(
    params: KmeansSelectorParams,
    plan: dict,
    library: ModelRef,
    selectors: dict,
    figures: dict,
    run: str,
) -> ModelRef:
    """The k-means selectors (one folder per kind) as a model version with lineage."""
    version = f"{library.name}@{library.version}"
    meta = {"mode": plan["mode"], "library": version, "training": selectors["stats"], **figures}
    build = partial(versions.publish_folder, saved=selectors["saved"], **meta)
    inputs = [*model_inputs(BackendSpec(model=params.base_model)), selectors["samples"], library]
    if plan["mode"] != "train":
        inputs.append(plan["selector"])
    kind = "adapter-selector"
    return save_model_version(SELECTOR_MODEL, build, kind=kind, produced_by=run, inputs=inputs)


KMEANS_SELECTOR_DEFAULTS = KmeansSelectorParams()
KMEANS_SELECTOR = Deployment(
    "selectors/kmeans", "k-means adapter selector", nightly_utc="30 5 * * *"
)


@KMEANS_SELECTOR.flow
def kmeans_selector(params: KmeansSelectorParams = KMEANS_SELECTOR_DEFAULTS) -> dict:
    """k-means LoRA adapter selector: per-task adapters, a selector on k-means samples."""
    with KMEANS_SELECTOR.run(params) as run:
        plan = check_inputs(params)
        tasks = None
        if plan["mode"] == "remove":
            library = plan["library"]  # removing changes the selector only
        else:
            tasks = task_data(params, plan)
            library = train_adapters(params, plan, tasks, run.id)
        selectors = train_selectors(params, plan, tasks, library, run.id)
        figures = evaluate(params, plan, library, selectors, run.id)
        selector = publish_selector(params, plan, library, selectors, figures, run.id)
        shutil.rmtree(_workdir(run.id), ignore_errors=True)
        made = {"adapters": library, "selector": selector}
        named = {key: f"{ref.name}@{ref.version}" for key, ref in made.items()}
        summary = ev.run_summary(figures, mode=plan["mode"], **named)
        run.summary(summary)
        dumped = {key: ref.model_dump() for key, ref in made.items()}
        return {**dumped, "figures": figures, "summary": summary}
