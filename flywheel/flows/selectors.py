"""`selectors/kmeans`: one LoRA adapter per task of a tasks dataset (a store dataset with
prompt, answer and task columns; by default the world's task families), a selector
trained on the samples nearest k-means centres, evaluated on held-out rows against
random selection at equal samples and against the base model and one multi-task
adapter; or, with `add`/`remove`, one adapter added to or removed from the latest
selector by updating the selector only. Wiring only; the parameters are
`flywheel.flows.selector_params`, the method is `flywheel.selectors`, the world's tasks
(its families, its checker) `flywheel.world.selector_tasks`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task

from flywheel.flows.outputs import reuse_or_write
from flywheel.flows.selector_params import KmeansSelectorParams
from flywheel.flows.tracking import Deployment, FlowRun, model_inputs
from flywheel.llm import BackendSpec
from flywheel.selectors import AdapterLibrary, AdaptersSelector
from flywheel.selectors import evaluation as ev
from flywheel.selectors import selector_versions as versions
from flywheel.selectors.library_version import library_builder
from flywheel.selectors.run_plan import SelectorPlan, plan_run, plan_scorer
from flywheel.selectors.tasks import task_pairs, task_prompts
from flywheel.store import DatasetRef, ModelRef, data_root, save_model_version, write_dataset
from flywheel.world.selector_tasks import WORLD

LIBRARY_MODEL = "kmeans-adapters"
SELECTOR_MODEL = "kmeans-selector"
TASKS_DATASET = "selector_tasks"
SAMPLES_DATASET = "selector_samples"
EVAL_DATASET = "selector_eval"


@task(name="check-inputs")
def check_inputs(params: KmeansSelectorParams) -> SelectorPlan:
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
    return plan_run(
        params.task_source(),
        tasks=params.tasks,
        add=params.add,
        remove=params.remove,
        need=params.k * params.per_centre,
        scorer=params.scorer,
        scorer_reward_model=params.scorer_reward_model,
        models=(SELECTOR_MODEL, LIBRARY_MODEL, WORLD),
    )


@task(name="task-data")
def task_data(params: KmeansSelectorParams, plan: SelectorPlan) -> DatasetRef:
    """The tasks dataset: the user's as read in check-inputs, or the world's families'
    (prompt, answer, task) rows written once per setting."""
    if plan.dataset is not None:
        return plan.dataset
    source, names = params.task_source(), plan.tasks
    producer = f"world-tasks:seed{params.seed}_n{params.samples_per_task}_{'-'.join(names)}"
    return reuse_or_write(TASKS_DATASET, producer, partial(source.rows, names))


@task(name="train-adapters")
def train_adapters(
    params: KmeansSelectorParams, plan: SelectorPlan, tasks: DatasetRef, run: str
) -> ModelRef:
    """A library version: an adapter per new task (reused when one was trained before with
    the same data, settings, base and code), the previous library's adapters copied
    byte-identically on add, and the multi-task baseline on a fresh run."""
    data, _ = task_pairs(tasks, params.task_source().layout, plan.tasks)
    previous = plan.library.path if plan.mode == "add" else None
    multi = plan.mode == "train" and params.multitask_baseline
    # the multi-task baseline: as many steps as the adapters together
    multitask = params.adapter_training(params.adapter_steps * len(data)) if multi else None
    training = params.adapter_training()
    build = library_builder(LIBRARY_MODEL, params.base_model, data, training, previous, multitask)
    inputs = [*model_inputs(BackendSpec(model=params.base_model)), tasks]
    kind = "lora-adapter-library"
    return save_model_version(LIBRARY_MODEL, build, kind=kind, produced_by=run, inputs=inputs)


def _workdir(run_id: str) -> Path:
    return data_root() / "_work" / "selectors" / run_id


@dataclass(frozen=True)
class TrainedSelectors:
    """{kind/selection: saved folder}, their training stats, the samples' dataset."""

    saved: dict[str, str]
    stats: dict[str, Any]
    samples: DatasetRef


@task(name="train-selectors")
def train_selectors(
    params: KmeansSelectorParams,
    plan: SelectorPlan,
    tasks: DatasetRef | None,
    library: ModelRef,
    run: str,
) -> TrainedSelectors:
    """Fresh run: k-means and random selectors of each kind on the same selection.
    add/remove: the latest selectors updated. Saved under the run's work folder; the
    selected samples written as a dataset."""
    adapters, layout, work = (
        AdapterLibrary(library.path),
        params.task_source().layout,
        _workdir(run),
    )
    prompts = {} if tasks is None else task_prompts(tasks, layout, plan.tasks)
    if plan.mode == "train":
        kinds = ["lora", "head"] if params.selector == "both" else [params.selector]
        config = params.selector_config()
        trained = versions.train_fresh(adapters, prompts, config, kinds, work, layout.label)
    else:
        previous, kinds = plan.selector.path, list(plan.names)
        trained = versions.update_selectors(
            previous, kinds, adapters, work, layout.label, params.add, prompts, params.remove
        )
    saved, stats, rows = trained
    # remove: the samples come from the previous selector, no task data is read
    source = [tasks] if tasks is not None else [plan.selector]
    samples = write_dataset(SAMPLES_DATASET, rows, produced_by=run, inputs=source)
    return TrainedSelectors(saved, stats, samples)


@task(name="evaluate")
def evaluate(
    params: KmeansSelectorParams,
    plan: SelectorPlan,
    library: ModelRef,
    selectors: TrainedSelectors,
    run: str,
) -> dict:
    """Routing accuracy (k-means vs random) and the scorer's task score (routed adapters
    vs the base model, the multi-task adapter and oracle routing) on held-out rows."""
    adapters, source = AdapterLibrary(library.path), params.task_source()
    systems = {k: AdaptersSelector.load(path, adapters) for k, path in selectors.saved.items()}
    data, own_exact = source.held_out(plan.dataset, next(iter(systems.values())).names)
    score = plan_scorer(plan, params.scorer, own_exact)
    max_new = params.max_new_tokens or source.max_new_tokens(adapters.base_model, data)
    before = None
    if plan.mode == "add":  # also the old tasks routed by the selector before the add
        before = (plan.selector.path, plan.library.path, list(plan.names))
    figures, rows = ev.evaluate_run(
        systems, data, score, max_new, source.layout.label, before=before, added=params.add
    )
    inputs = [selectors.samples, library, *([plan.scorer_model] if plan.scorer_model else [])]
    ref = write_dataset(EVAL_DATASET, rows, produced_by=run, inputs=inputs)
    figures["dataset"] = f"{ref.name}@{ref.version}"
    figures["eval_tasks"] = len(data.prompts)
    figures["scorer"] = params.scorer_reward_model or params.scorer
    figures["tasks_dataset"] = source.name
    return figures


@task(name="publish-selector")
def publish_selector(
    params: KmeansSelectorParams,
    plan: SelectorPlan,
    library: ModelRef,
    selectors: TrainedSelectors,
    figures: dict,
    run: str,
) -> ModelRef:
    """The k-means selectors (one folder per kind) as a model version with lineage."""
    version = f"{library.name}@{library.version}"
    meta = {"mode": plan.mode, "library": version, "training": selectors.stats, **figures}
    build = partial(versions.publish_folder, saved=selectors.saved, **meta)
    inputs = [*model_inputs(BackendSpec(model=params.base_model)), selectors.samples, library]
    if plan.mode != "train":
        inputs.append(plan.selector)
    kind = "adapter-selector"
    return save_model_version(SELECTOR_MODEL, build, kind=kind, produced_by=run, inputs=inputs)


KMEANS_SELECTOR = Deployment("selectors/kmeans", "k-means adapter selector", KmeansSelectorParams)


@KMEANS_SELECTOR.flow(check=check_inputs)
def kmeans_selector(params: KmeansSelectorParams, plan: SelectorPlan, run: FlowRun) -> dict:
    """k-means LoRA adapter selector: per-task adapters, a selector on k-means samples."""
    tasks = None
    if plan.mode == "remove":
        library = plan.library  # removing changes the selector only
    else:
        tasks = task_data(params, plan)
        library = train_adapters(params, plan, tasks, run.id)
    selectors = train_selectors(params, plan, tasks, library, run.id)
    figures = evaluate(params, plan, library, selectors, run.id)
    selector = publish_selector(params, plan, library, selectors, figures, run.id)
    shutil.rmtree(_workdir(run.id), ignore_errors=True)
    made = {"adapters": library, "selector": selector}
    named = {key: f"{ref.name}@{ref.version}" for key, ref in made.items()}
    summary = ev.run_summary(figures, mode=plan.mode, **named)
    run.summary(summary)
    dumped = {key: ref.model_dump() for key, ref in made.items()}
    return {**dumped, "figures": figures, "summary": summary}
