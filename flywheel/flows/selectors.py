"""`selectors/kmeans`: one LoRA adapter per task of a tasks dataset (a store dataset with
prompt, answer and task columns; by default the world's task families), a selector
trained on the samples nearest k-means centres, evaluated on held-out rows against
random selection at equal samples and against the base model and one multi-task
adapter; or, with `add`/`remove`, one adapter added to or removed from the latest
selector by updating the selector only. Wiring only; the method is `flywheel.selectors`."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field

from flywheel.flows.tracking import (
    model_inputs,
    recorded_run,
    reuse_or_write,
)
from flywheel.llm import BackendSpec, model_fingerprint
from flywheel.llm import training as training_module
from flywheel.selectors import adapters as adapters_module
from flywheel.selectors import kmeans as kmeans_module
from flywheel.selectors.adapters import (
    AdapterLibrary,
    LoraTraining,
    PromptEmbedder,
    SelectorInputError,
    check_adapter_name,
    train_lora,
)
from flywheel.selectors.evaluation import SCORERS, EvalSet, Scorer, evaluate_selectors
from flywheel.selectors.kmeans import (
    AdaptersSelector,
    SelectorConfig,
    generate_greedy,
    select_samples,
)
from flywheel.store import (
    DatasetNotFound,
    DatasetRef,
    ModelNotRegistered,
    ModelRef,
    data_root,
    list_model_versions,
    read_dataset,
    read_model,
    save_model_version,
    write_dataset,
)
from flywheel.world.bootstrap import held_out_tasks, model_dir, models_root
from flywheel.world.tasks import FAMILIES, MAX_LEN, Task, check, sample_tasks

LIBRARY_MODEL = "kmeans-adapters"
SELECTOR_MODEL = "kmeans-selector"
TASKS_DATASET = "selector_tasks"
SAMPLES_DATASET = "selector_samples"
EVAL_DATASET = "selector_eval"
MULTITASK = "_multitask"  # the baseline's folder in a library version; never an adapter name
WORLD = "world"  # what `tasks_dataset` null records as the tasks' source
# the world's tasks dataset: the shape a user's tasks dataset has, with the default columns
WORLD_COLUMNS = {"prompt": "prompt", "answer": "answer", "task": "task"}
SOURCE = hashlib.sha256(
    b"".join(
        Path(m.__file__).read_bytes() for m in (adapters_module, kmeans_module, training_module)
    )
).hexdigest()


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

    @property
    def source(self) -> str:
        """Where the tasks come from, as recorded with a selector: a dataset name or world."""
        return self.tasks_dataset or WORLD

    def columns(self) -> dict[str, str]:
        if self.tasks_dataset is None:
            return WORLD_COLUMNS
        return {
            "prompt": self.prompt_column,
            "answer": self.answer_column,
            "task": self.task_column,
        }

    def kinds(self) -> list[str]:
        return ["lora", "head"] if self.selector == "both" else [self.selector]

    def adapter_training(self, steps: int | None = None) -> LoraTraining:
        return LoraTraining(
            rank=self.adapter_rank,
            steps=steps or self.adapter_steps,
            lr=self.adapter_lr,
            seed=self.seed,
            target_modules=self.target_modules,
        )

    def selector_config(self, kind: str, selection: str = "kmeans") -> SelectorConfig:
        return SelectorConfig(
            kind=kind,
            selection=selection,
            k=self.k,
            per_centre=self.per_centre,
            distance=self.distance,
            rank=self.selector_rank,
            steps=self.selector_steps,
            old_share=self.old_share,
            target_modules=self.target_modules,
            seed=self.seed,
        )


def _latest_selector(
    field: str, params: KmeansSelectorParams
) -> tuple[ModelRef, ModelRef, dict[str, list[str]]]:
    """The latest selector version, its library version and {kind: names}; it must have
    been trained on the same tasks' source as this run's."""
    try:
        selector = read_model(SELECTOR_MODEL)
    except ModelNotRegistered as e:
        raise ValueError(
            f"{field}: there is no {SELECTOR_MODEL} to update yet; run selectors/kmeans "
            f"without add/remove first ({e})"
        ) from e
    meta = selector.meta
    source = meta["metrics"].get("tasks_dataset", WORLD)
    if source != params.source:
        raise ValueError(
            f"tasks_dataset: {SELECTOR_MODEL}@{selector.version} was trained on the tasks of "
            f"{source!r}, this run names {params.source!r}; give tasks_dataset "
            f"{None if source == WORLD else source!r} to {field} an adapter"
        )
    library = next(i for i in meta["inputs"] if i["name"] == LIBRARY_MODEL)
    return selector, read_model(LIBRARY_MODEL, library["version"]), meta["metrics"]["names"]


def _world_selection(params: KmeansSelectorParams) -> list[str]:
    if params.tasks is not None and params.families is not None:
        raise ValueError("tasks, families: give one of them (both name the world's families)")
    field = "tasks" if params.tasks is not None else "families"
    chosen = params.tasks if params.tasks is not None else params.families
    families = list(FAMILIES) if chosen is None else list(chosen)
    if not families:
        raise ValueError(f"{field}: empty; give some of {sorted(FAMILIES)} or null for all")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"{field}: unknown task family {unknown}; known: {sorted(FAMILIES)}")
    if len(set(families)) != len(families):
        raise ValueError(f"{field}: {families} names a family twice; list each once")
    if params.add is not None and params.add not in FAMILIES:
        raise ValueError(f"add: unknown task family {params.add!r}; known: {sorted(FAMILIES)}")
    if params.k * params.per_centre > params.samples_per_task:
        raise ValueError(
            f"k * per_centre = {params.k * params.per_centre} is more than samples_per_task="
            f"{params.samples_per_task}; lower k or per_centre, or raise samples_per_task"
        )
    return families


def _read_tasks(params: KmeansSelectorParams) -> tuple[DatasetRef, dict[str, list[dict]]]:
    """The tasks dataset and its rows by task value, in order of first appearance; every
    column present and every value text, or an error naming the field, row and fix."""
    try:
        ref = read_dataset(params.tasks_dataset, params.tasks_dataset_version)  # type: ignore[arg-type]
    except DatasetNotFound as e:
        raise ValueError(
            f"tasks_dataset: {e}; write the tasks with flywheel.store.write_dataset or "
            "`flywheel import`, or leave tasks_dataset null for the world's tasks"
        ) from e
    source = f"tasks_dataset {ref.name}@{ref.version}"
    table = ref.to_arrow()
    for field, column in params.columns().items():
        if column not in table.column_names:
            raise ValueError(
                f"{field}_column: {source} has no column {column!r}; its columns are "
                f"{table.column_names}; set {field}_column to the column holding each row's "
                f"{field}"
            )
    by_task: dict[str, list[dict]] = {}
    cols = params.columns()
    for i, row in enumerate(table.select(list(cols.values())).to_pylist()):
        for field, column in cols.items():
            value = row[column]
            if not isinstance(value, str) or (field != "answer" and not value.strip()):
                raise ValueError(
                    f"{field}_column: {source} row {i} has {value!r} in {column!r}; each row "
                    f"needs {field} text: fill or drop the row"
                )
        by_task.setdefault(row[cols["task"]], []).append(
            {"prompt": row[cols["prompt"]], "answer": row[cols["answer"]]}
        )
    for name in by_task:
        try:
            check_adapter_name(name, f"task_column {cols['task']!r} value")
        except SelectorInputError as e:
            raise ValueError(f"{e}: task values name the adapters; rename them") from e
    return ref, by_task


def _split(rows: list[dict], eval_fraction: float, seed: int, task: str) -> tuple[list, list]:
    """(train, held-out) rows of one task: a seeded shuffle, at least one row held out."""
    order = list(range(len(rows)))
    random.Random(f"{seed}-{task}").shuffle(order)
    n_eval = max(1, round(eval_fraction * len(rows)))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def _dataset_selection(params: KmeansSelectorParams) -> tuple[DatasetRef, list[str]]:
    if params.families is not None:
        raise ValueError(
            "families: names world task families; with a tasks_dataset, give `tasks` (which "
            "values of the task column to train adapters for)"
        )
    ref, by_task = _read_tasks(params)
    column = params.task_column
    values = list(by_task)
    chosen = values if params.tasks is None else list(params.tasks)
    unknown = [t for t in chosen if t not in by_task]
    if unknown:
        raise ValueError(
            f"tasks: {unknown} are not values of column {column!r} in {ref.name}@{ref.version}; "
            f"its task values: {values}"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"tasks: {chosen} names a task twice; list each once")
    if params.add is None and params.remove is None and len(chosen) < 2:
        raise ValueError(
            f"tasks: {len(chosen)} task value(s) {chosen} in column {column!r}; the selector "
            "routes between tasks: give a dataset (or `tasks`) with at least 2 task values"
        )
    if params.add is not None and params.add not in by_task:
        raise ValueError(
            f"add: {params.add!r} is not a value of column {column!r} in "
            f"{ref.name}@{ref.version}; its task values: {values}"
        )
    need = params.k * params.per_centre
    for task_name in [params.add] if params.add is not None else chosen:
        rows = by_task[task_name]
        train, held = _split(rows, params.eval_fraction, params.seed, task_name)
        if len(train) < need or len(rows) < 2:
            raise ValueError(
                f"tasks_dataset: task {task_name!r} has {len(rows)} rows, {len(train)} for "
                f"training after eval_fraction={params.eval_fraction} holds out {len(held)}; "
                f"the selector needs k * per_centre = {need} of them: lower k or per_centre "
                "or eval_fraction, or give the task more rows"
            )
    return ref, chosen


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
    plan: dict[str, Any] = {"mode": "train", "dataset": None}
    if params.tasks_dataset is None:
        plan["tasks"] = _world_selection(params)
    else:
        plan["dataset"], plan["tasks"] = _dataset_selection(params)
    if (params.scorer == "reward_model") != (params.scorer_reward_model is not None):
        raise ValueError(
            "scorer_reward_model: give it exactly when scorer is 'reward_model' (scorer is "
            f"{params.scorer!r})"
        )
    if params.scorer_reward_model is not None:
        _reward_model(params.scorer_reward_model)
    if params.add is not None:
        selector, library, names = _latest_selector("add", params)
        known = next(iter(names.values()))
        if params.add in known:
            raise ValueError(
                f"add: {SELECTOR_MODEL}@{selector.version} already routes to {params.add!r} "
                f"(known: {known}); remove it first or add another task"
            )
        plan.update(mode="add", selector=selector, library=library, names=names)
    if params.remove is not None:
        selector, library, names = _latest_selector("remove", params)
        known = next(iter(names.values()))
        if params.remove not in known:
            raise ValueError(
                f"remove: {SELECTOR_MODEL}@{selector.version} routes to no adapter "
                f"{params.remove!r}; known: {known}"
            )
        if len(known) == 1:
            raise ValueError(
                f"remove: {params.remove!r} is the selector's only adapter; add another first"
            )
        plan.update(mode="remove", selector=selector, library=library, names=names)
    return plan


def _reward_model(name: str) -> ModelRef:
    try:
        reward = read_model(name)
    except ModelNotRegistered as e:
        raise ValueError(
            f"scorer_reward_model: {e}; train one with reward/train or pick another scorer"
        ) from e
    if reward.meta["kind"] not in ("bradley-terry", "ensemble"):
        raise ValueError(
            f"scorer_reward_model: {reward.name}@{reward.version} is a {reward.meta['kind']!r} "
            "model, not a reward model; train one with reward/train"
        )
    return reward


def _family_tasks(family: str, n: int, seed: int) -> list[Task]:
    # one generator per family: a family's data is the same whichever others run with it
    return sample_tasks(n, random.Random(f"{seed}-{family}"), [family])


@task(name="task-data")
def task_data(params: KmeansSelectorParams, plan: dict, names: list[str]) -> DatasetRef:
    """The tasks dataset: the user's as read in check-inputs, or the world's families'
    (prompt, answer, task) rows written once per setting."""
    if plan["dataset"] is not None:
        return plan["dataset"]

    def rows() -> list[dict]:
        return [
            {"task": t.family, "id": t.id, "prompt": t.prompt, "answer": t.answer}
            for f in names
            for t in _family_tasks(f, params.samples_per_task, params.seed)
        ]

    producer = f"world-tasks:seed{params.seed}_n{params.samples_per_task}_{'-'.join(names)}"
    return reuse_or_write(TASKS_DATASET, producer, rows)


def _task_rows(
    params: KmeansSelectorParams, ref: DatasetRef, names: list[str]
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[tuple[str, str]]]]:
    """({task: training pairs}, {task: held-out pairs}) for `names`. The world's rows are
    all for training (it is evaluated on fresh held-out tasks)."""
    cols = params.columns()
    by_task: dict[str, list[dict]] = {}
    for row in ref.to_arrow().select(list(cols.values())).to_pylist():
        if row[cols["task"]] in names:
            by_task.setdefault(row[cols["task"]], []).append(
                {"prompt": row[cols["prompt"]], "answer": row[cols["answer"]]}
            )
    train: dict[str, list[tuple[str, str]]] = {}
    held: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        rows = by_task.get(name, [])
        if params.tasks_dataset is None:
            fit, out = rows, []
        else:
            fit, out = _split(rows, params.eval_fraction, params.seed, name)
        train[name] = [(r["prompt"], r["answer"]) for r in fit]
        held[name] = [(r["prompt"], r["answer"]) for r in out]
    return train, held


def _task_fields(params: KmeansSelectorParams, name: str) -> dict[str, str]:
    # the world's rows keep their `family` column beside `task`
    return {"task": name, **({"family": name} if params.tasks_dataset is None else {})}


def _adapter_key(
    params: KmeansSelectorParams, what: str, pairs: list[tuple[str, str]], training: LoraTraining
) -> str:
    parts = [
        what,
        hashlib.sha256(json.dumps(pairs).encode()).hexdigest(),
        training.model_dump_json(),
        model_fingerprint(BackendSpec(model=params.base_model)),
        SOURCE,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _earlier_adapter(key: str) -> Path | None:
    """A folder of an adapter trained before with the same key (data, settings, base, code)."""
    for version in reversed(list_model_versions(LIBRARY_MODEL)):
        folder = Path(read_model(LIBRARY_MODEL, version).path)
        index = json.loads((folder / "library.json").read_text())
        for name, info in {**index["adapters"], **index.get("baselines", {})}.items():
            if info.get("key") == key:
                return folder / name
    return None


@task(name="train-adapters")
def train_adapters(
    params: KmeansSelectorParams, plan: dict, tasks: DatasetRef, names: list[str], run_id: str
) -> ModelRef:
    """A library version: an adapter per new task (reused when one was trained before with
    the same data, settings, base and code), the previous library's adapters copied
    byte-identically on add, and the multi-task baseline on a fresh run."""
    data, _ = _task_rows(params, tasks, names)
    training = params.adapter_training()

    def build(folder: Path) -> dict:
        if plan["mode"] == "add":
            library = AdapterLibrary(plan["library"].path).copy_to(folder)
        else:
            library = AdapterLibrary.create(folder, params.base_model)
        figures: dict[str, Any] = {"adapters": {}}
        for name in data:
            key = _adapter_key(params, name, data[name], training)
            info = {"key": key, "train_examples": len(data[name])}
            if name in library.names:
                # removed from the selector earlier, still in the library: route to it again
                pass
            elif earlier := _earlier_adapter(key):
                library.add(name, earlier, {**info, "reused_from": str(earlier)})
            else:
                library.train(name, data[name], training, info)
            figures["adapters"][name] = library.info(name)
        if plan["mode"] == "train" and params.multitask_baseline:
            steps = params.adapter_steps * len(data)  # the same total steps as the adapters
            multi = params.adapter_training(steps)
            every = [pair for pairs in data.values() for pair in pairs]
            key = _adapter_key(params, "multitask:" + ",".join(data), every, multi)
            if earlier := _earlier_adapter(key):
                shutil.copytree(earlier, folder / MULTITASK)
                stats: dict = {"reused_from": str(earlier)}
            else:
                stats = train_lora(params.base_model, every, folder / MULTITASK, multi)
            index = json.loads((folder / "library.json").read_text())
            index["baselines"] = {MULTITASK: {"key": key, "steps": steps, "train": stats}}
            (folder / "library.json").write_text(json.dumps(index, indent=2, default=str))
            figures["multitask"] = index["baselines"][MULTITASK]
        figures["names"] = library.names
        return json.loads(json.dumps(figures, default=str))

    return save_model_version(
        LIBRARY_MODEL,
        build,
        kind="lora-adapter-library",
        produced_by=run_id,
        inputs=[*model_inputs(BackendSpec(model=params.base_model)), tasks],
    )


def _workdir(run_id: str) -> Path:
    return data_root() / "_work" / "selectors" / run_id


@task(name="train-selectors")
def train_selectors(
    params: KmeansSelectorParams,
    plan: dict,
    tasks: DatasetRef | None,
    names: list[str],
    library_ref: ModelRef,
    run_id: str,
) -> dict:
    """Fresh run: k-means and random selectors of each kind on the same selection.
    add/remove: the latest selectors updated. Saved under the run's work folder; the
    selected samples written as a dataset."""
    library = AdapterLibrary(library_ref.path)
    work = _workdir(run_id)
    prompts: dict[str, list[str]] = {}
    if tasks is not None:
        train, _ = _task_rows(params, tasks, names)
        prompts = {name: [p for p, _ in pairs] for name, pairs in train.items()}
    embedder = PromptEmbedder(library.base_model)
    saved: dict[str, str] = {}
    stats: dict[str, Any] = {}
    rows: list[dict] = []
    if plan["mode"] == "train":
        for selection in ("kmeans", "random"):
            config = params.selector_config("lora", selection)
            samples = select_samples(
                prompts,
                embedder,
                k=config.k,
                per_centre=config.per_centre,
                distance=config.distance,
                selection=selection,
                seed=config.seed,
            )
            rows += [
                {**_task_fields(params, f), "prompt": p, "selection": selection, "rank": r}
                for f, ps in samples.items()
                for r, p in enumerate(ps)
            ]
            for kind in params.kinds():
                config = params.selector_config(kind, selection)
                system = AdaptersSelector.from_samples(library, samples, config, embedder)
                stats[f"{kind}/{selection}"] = system.selector.stats
                saved[f"{kind}/{selection}"] = str(system.save(work / kind / selection))
    else:
        previous = Path(plan["selector"].path)
        for kind in plan["names"]:
            system = AdaptersSelector.load(previous / kind, library)
            if plan["mode"] == "add":
                name = params.add
                stats[kind] = system.add_adapter(name, library.path(name), prompts[name])
            else:
                stats[kind] = system.remove_adapter(params.remove)
            saved[f"{kind}/updated"] = str(system.save(work / kind / "updated"))
            rows += [
                {**_task_fields(params, f), "prompt": p, "selection": f"{kind}:kmeans", "rank": r}
                for f, ps in system.selector.samples.items()
                for r, p in enumerate(ps)
            ]
    # remove: the samples come from the previous selector, no task data is read
    source = [tasks] if tasks is not None else [plan["selector"]]
    samples_ref = write_dataset(SAMPLES_DATASET, rows, produced_by=run_id, inputs=source)
    return {"saved": saved, "stats": stats, "samples": samples_ref}


def _eval_set(params: KmeansSelectorParams, plan: dict, known: list[str]) -> tuple[EvalSet, Scorer]:
    """The held-out rows of the known tasks and the scorer: for the world, fresh held-out
    tasks (HELD_OUT_TASK_SEED, a seed the task data never uses) and, for exact match, its
    checker."""
    if plan["dataset"] is None:
        tasks = [t for t in held_out_tasks(params.eval_tasks) if t.family in known]
        data = EvalSet(
            [t.prompt for t in tasks], [t.family for t in tasks], [t.answer for t in tasks]
        )
        if params.scorer == "exact_match":
            by_prompt = {t.prompt: t for t in tasks}  # a prompt states its task in full

            def world_check(prompts, outputs, answers) -> list[float]:
                return [check(by_prompt[p], o) for p, o in zip(prompts, outputs, strict=True)]

            return data, world_check
    else:
        _, held = _task_rows(params, plan["dataset"], known)
        pairs = [(name, p, a) for name in known for p, a in held[name]]
        data = EvalSet([p for _, p, _ in pairs], [n for n, _, _ in pairs], [a for _, _, a in pairs])
    if params.scorer == "reward_model":
        return data, _reward_scorer(_reward_model(params.scorer_reward_model))  # type: ignore[arg-type]
    return data, SCORERS[params.scorer]


def _reward_scorer(reward: ModelRef) -> Scorer:
    """A registered reward model's score of each (prompt, output)."""
    from flywheel.reward_models.bradley_terry import RewardModel
    from flywheel.reward_models.ensemble import EnsembleRewardModel

    model = (EnsembleRewardModel if reward.meta["kind"] == "ensemble" else RewardModel)(reward.path)

    def score(prompts, outputs, answers) -> list[float]:
        scores = model.score(list(prompts), list(outputs))
        return scores["mean"] if isinstance(scores, dict) else list(scores)

    return score


def _max_new_tokens(params: KmeansSelectorParams, library: AdapterLibrary, data: EvalSet) -> int:
    if params.max_new_tokens is not None:
        return params.max_new_tokens
    if params.tasks_dataset is None:
        return MAX_LEN + 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(library.base_model, local_files_only=True)
    return max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in data.answers) + 2


@task(name="evaluate")
def evaluate(
    params: KmeansSelectorParams,
    plan: dict,
    library_ref: ModelRef,
    selectors: dict,
    run_id: str,
) -> dict:
    """Routing accuracy (k-means vs random) and the scorer's task score (routed adapters
    vs the base model, the multi-task adapter and oracle routing) on held-out rows."""
    library = AdapterLibrary(library_ref.path)
    systems = {
        key: AdaptersSelector.load(path, library) for key, path in selectors["saved"].items()
    }
    known = next(iter(systems.values())).names
    data, scorer = _eval_set(params, plan, known)
    max_new = _max_new_tokens(params, library, data)
    baselines = {}
    if (Path(library_ref.path) / MULTITASK).is_dir():
        from peft import PeftModel

        from flywheel.selectors.adapters import load_base

        def multitask(prompts: list[str]) -> list[str]:
            base, tok = load_base(library.base_model)
            multi = PeftModel.from_pretrained(base, str(Path(library_ref.path) / MULTITASK))
            return generate_greedy(multi.eval(), tok, prompts, max_new)

        baselines["multi-task adapter"] = multitask
    result = evaluate_selectors(systems, data, scorer, max_new_tokens=max_new, baselines=baselines)
    rows = [{**r, **_task_fields(params, r["task"])} for r in result.pop("rows")]
    figures: dict[str, Any] = dict(result)
    if plan["mode"] == "add":
        # old tasks, routed by the selector before the add and after it
        old = data.subset(lambda t: t != params.add)
        before_lib = AdapterLibrary(plan["library"].path)
        for kind in plan["names"]:
            before = AdaptersSelector.load(Path(plan["selector"].path) / kind, before_lib)
            got = evaluate_selectors(
                {kind: before}, old, scorer, max_new_tokens=max_new, oracle=False, base=False
            )
            after = [
                r["score"]
                for r in rows
                if r["system"] == f"routed {kind}/updated" and r["task"] != params.add
            ]
            figures[f"old tasks routed accuracy {kind}"] = {
                "before": got["task_accuracy"][f"routed {kind}"],
                "after": sum(after) / max(1, len(after)),
            }
    ref = write_dataset(
        EVAL_DATASET, rows, produced_by=run_id, inputs=[selectors["samples"], library_ref]
    )
    figures["dataset"] = f"{ref.name}@{ref.version}"
    figures["eval_tasks"] = len(data.prompts)
    figures["scorer"] = params.scorer_reward_model or params.scorer
    figures["tasks_dataset"] = params.source
    return figures


@task(name="publish-selector")
def publish_selector(
    params: KmeansSelectorParams,
    plan: dict,
    library_ref: ModelRef,
    selectors: dict,
    figures: dict,
    run_id: str,
) -> ModelRef:
    """The k-means selectors (one folder per kind) as a model version with lineage."""
    chosen = {
        key.split("/")[0]: path
        for key, path in selectors["saved"].items()
        if key.endswith("/kmeans") or key.endswith("/updated")
    }

    def build(folder: Path) -> dict:
        names = {}
        for kind, path in chosen.items():
            shutil.copytree(path, folder / kind)
            names[kind] = json.loads((folder / kind / "selector.json").read_text())["names"]
        return json.loads(
            json.dumps(
                {
                    "mode": plan["mode"],
                    "names": names,
                    "library": f"{library_ref.name}@{library_ref.version}",
                    "training": selectors["stats"],
                    **figures,
                },
                default=str,
            )
        )

    inputs: list[Any] = [
        *model_inputs(BackendSpec(model=params.base_model)),
        selectors["samples"],
        library_ref,
    ]
    if plan["mode"] != "train":
        inputs.append(plan["selector"])
    return save_model_version(
        SELECTOR_MODEL, build, kind="adapter-selector", produced_by=run_id, inputs=inputs
    )


# defaults in the signature: the UI shows and pre-fills them
KMEANS_SELECTOR_DEFAULTS = KmeansSelectorParams()


@flow(name="selectors")
def kmeans_selector(params: KmeansSelectorParams = KMEANS_SELECTOR_DEFAULTS) -> dict:
    """k-means LoRA adapter selector: per-task adapters, a selector on k-means samples."""
    with recorded_run("selectors/kmeans", "k-means adapter selector", params) as run:
        plan = check_inputs(params)
        tasks = None
        names = [params.add] if plan["mode"] == "add" else plan["tasks"]
        if plan["mode"] == "remove":
            library = plan["library"]  # removing changes the selector only
        else:
            tasks = task_data(params, plan, names)
            library = train_adapters(params, plan, tasks, names, run.id)
        selectors = train_selectors(params, plan, tasks, names, library, run.id)
        figures = evaluate(params, plan, library, selectors, run.id)
        selector = publish_selector(params, plan, library, selectors, figures, run.id)
        shutil.rmtree(_workdir(run.id), ignore_errors=True)
        summary = {
            "mode": plan["mode"],
            "tasks": figures["tasks_dataset"],
            "scorer": figures["scorer"],
            "adapters": f"{library.name}@{library.version}",
            "selector": f"{selector.name}@{selector.version}",
            **{
                f"routing accuracy {key}": acc["all"]
                for key, acc in figures["routing_accuracy"].items()
            },
            **{f"task accuracy {key}": acc for key, acc in figures["task_accuracy"].items()},
            **{
                f"{key}: {when}": value
                for key, entry in figures.items()
                if key.startswith("old tasks")
                for when, value in entry.items()
            },
            "held-out tasks": figures["eval_tasks"],
            "evaluation dataset": figures["dataset"],
        }
        run.summary(summary)
        return {
            "adapters": library.model_dump(),
            "selector": selector.model_dump(),
            "figures": figures,
            "summary": summary,
        }
