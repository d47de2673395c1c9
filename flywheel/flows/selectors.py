"""`selectors/kmeans`: one LoRA adapter per world task family, a selector trained on the
samples nearest k-means centres, evaluated against random selection at equal samples and
against the base model and one multi-task adapter; or, with `add`/`remove`, one adapter
added to or removed from the latest selector by updating the selector only. Wiring only;
the method is `flywheel.selectors`."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field

from flywheel.flows.tracking import model_inputs, reuse_or_write, summary_artifact, tracked_run
from flywheel.llm import BackendSpec, model_fingerprint
from flywheel.selectors import adapters as adapters_module
from flywheel.selectors import kmeans as kmeans_module
from flywheel.selectors.adapters import AdapterLibrary, LoraTraining, PromptEmbedder, train_lora
from flywheel.selectors.kmeans import (
    AdaptersSelector,
    SelectorConfig,
    generate_greedy,
    routing_accuracy,
    select_samples,
)
from flywheel.store import (
    DatasetRef,
    ModelNotRegistered,
    ModelRef,
    data_root,
    list_model_versions,
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
SOURCE = hashlib.sha256(
    b"".join(Path(m.__file__).read_bytes() for m in (adapters_module, kmeans_module))
).hexdigest()


def default_base_model() -> str:
    return str(model_dir(models_root(), "small"))


class KmeansSelectorParams(BaseModel):
    """Parameters of `selectors/kmeans`."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default_factory=default_base_model, description="base model folder")
    families: list[str] | None = Field(None, description="world task families; null: all")
    samples_per_task: int = Field(1000, ge=1, description="task data per family")
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
    multitask_baseline: bool = Field(
        True, description="train one adapter on all tasks' data with the same total steps"
    )
    seed: int = 0
    add: str | None = Field(None, description="a family to add to the latest selector")
    remove: str | None = Field(None, description="an adapter to remove from the latest selector")

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


def _latest_selector(field: str) -> tuple[ModelRef, ModelRef, dict[str, list[str]]]:
    """The latest selector version, its library version and {kind: names}."""
    try:
        selector = read_model(SELECTOR_MODEL)
    except ModelNotRegistered as e:
        raise ValueError(
            f"{field}: there is no {SELECTOR_MODEL} to update yet; run selectors/kmeans "
            f"without add/remove first ({e})"
        ) from e
    meta = selector.meta
    library = next(i for i in meta["inputs"] if i["name"] == LIBRARY_MODEL)
    return selector, read_model(LIBRARY_MODEL, library["version"]), meta["metrics"]["names"]


@task(name="check-inputs")
def check_inputs(params: KmeansSelectorParams) -> dict:
    """Fail before anything is trained: the base folder, the families, k and per_centre
    against the data size, and for add/remove the latest selector and the name."""
    if not (Path(params.base_model).expanduser() / "config.json").exists():
        raise FileNotFoundError(
            f"base_model: no model folder at {params.base_model}; run `prefect deployment run "
            "world/bootstrap` for the world models, or pass a base model folder"
        )
    families = list(FAMILIES) if params.families is None else list(params.families)
    if not families:
        raise ValueError(f"families: empty; give some of {sorted(FAMILIES)} or null for all")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families: unknown task family {unknown}; known: {sorted(FAMILIES)}")
    if len(set(families)) != len(families):
        raise ValueError(f"families: {families} names a family twice; list each once")
    if params.k * params.per_centre > params.samples_per_task:
        raise ValueError(
            f"k * per_centre = {params.k * params.per_centre} is more than samples_per_task="
            f"{params.samples_per_task}; lower k or per_centre, or raise samples_per_task"
        )
    if params.add and params.remove:
        raise ValueError("add, remove: give one of them per run, not both")
    plan: dict[str, Any] = {"mode": "train", "families": families}
    if params.add is not None:
        if params.add not in FAMILIES:
            raise ValueError(f"add: unknown task family {params.add!r}; known: {sorted(FAMILIES)}")
        selector, library, names = _latest_selector("add")
        known = next(iter(names.values()))
        if params.add in known:
            raise ValueError(
                f"add: {SELECTOR_MODEL}@{selector.version} already routes to {params.add!r} "
                f"(known: {known}); remove it first or add another family"
            )
        plan.update(mode="add", selector=selector, library=library, names=names)
    if params.remove is not None:
        selector, library, names = _latest_selector("remove")
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


def _family_tasks(family: str, n: int, seed: int) -> list[Task]:
    # one generator per family: a family's data is the same whichever others run with it
    return sample_tasks(n, random.Random(f"{seed}-{family}"), [family])


@task(name="task-data")
def task_data(params: KmeansSelectorParams, families: list[str]) -> DatasetRef:
    """The families' (prompt, answer) data as a store dataset, written once per setting."""

    def rows() -> list[dict]:
        return [
            {"family": t.family, "id": t.id, "prompt": t.prompt, "answer": t.answer}
            for f in families
            for t in _family_tasks(f, params.samples_per_task, params.seed)
        ]

    producer = f"world:seed{params.seed}_n{params.samples_per_task}_{'-'.join(families)}"
    return reuse_or_write(TASKS_DATASET, producer, rows)


def _by_family(ref: DatasetRef) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for row in ref.to_pandas().to_dict("records"):
        out.setdefault(row["family"], []).append((row["prompt"], row["answer"]))
    return out


def _adapter_key(params: KmeansSelectorParams, what: str, training: LoraTraining) -> str:
    parts = [
        what,
        f"n{params.samples_per_task}_seed{params.seed}",
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
    params: KmeansSelectorParams, plan: dict, tasks: DatasetRef, run_id: str
) -> ModelRef:
    """A library version: an adapter per new family (reused when one was trained before with
    the same data, settings, base and code), the previous library's adapters copied
    byte-identically on add, and the multi-task baseline on a fresh run."""
    data = _by_family(tasks)
    training = params.adapter_training()

    def build(folder: Path) -> dict:
        if plan["mode"] == "add":
            library = AdapterLibrary(plan["library"].path).copy_to(folder)
        else:
            library = AdapterLibrary.create(folder, params.base_model)
        figures: dict[str, Any] = {"adapters": {}}
        for family in data:
            key = _adapter_key(params, family, training)
            info = {"key": key, "train_examples": len(data[family])}
            if family in library.names:
                # removed from the selector earlier, still in the library: route to it again
                pass
            elif earlier := _earlier_adapter(key):
                library.add(family, earlier, {**info, "reused_from": str(earlier)})
            else:
                library.train(family, data[family], training, info)
            figures["adapters"][family] = library.info(family)
        if plan["mode"] == "train" and params.multitask_baseline:
            steps = params.adapter_steps * len(data)  # the same total steps as the adapters
            multi = params.adapter_training(steps)
            key = _adapter_key(params, "multitask:" + ",".join(data), multi)
            every = [pair for pairs in data.values() for pair in pairs]
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
    library_ref: ModelRef,
    run_id: str,
) -> dict:
    """Fresh run: k-means and random selectors of each kind on the same selection.
    add/remove: the latest selectors updated. Saved under the run's work folder; the
    selected samples written as a dataset."""
    library = AdapterLibrary(library_ref.path)
    work = _workdir(run_id)
    prompts = {f: [p for p, _ in pairs] for f, pairs in _by_family(tasks).items()} if tasks else {}
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
                {"family": f, "prompt": p, "selection": selection, "rank": r}
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
                family = params.add
                stats[kind] = system.add_adapter(family, library.path(family), prompts[family])
            else:
                stats[kind] = system.remove_adapter(params.remove)
            saved[f"{kind}/updated"] = str(system.save(work / kind / "updated"))
            rows += [
                {"family": f, "prompt": p, "selection": f"{kind}:kmeans", "rank": r}
                for f, ps in system.selector.samples.items()
                for r, p in enumerate(ps)
            ]
    # remove: the samples come from the previous selector, no task data is read
    source = [tasks] if tasks is not None else [plan["selector"]]
    samples_ref = write_dataset(SAMPLES_DATASET, rows, produced_by=run_id, inputs=source)
    return {"saved": saved, "stats": stats, "samples": samples_ref}


def _eval_tasks(params: KmeansSelectorParams, families: list[str]) -> list[Task]:
    # EVAL_SEED: a seed the task data (string seeds per family) never uses
    return [t for t in held_out_tasks(params.eval_tasks) if t.family in families]


@task(name="evaluate")
def evaluate(
    params: KmeansSelectorParams,
    plan: dict,
    library_ref: ModelRef,
    selectors: dict,
    run_id: str,
) -> dict:
    """Routing accuracy (k-means vs random) and exact-match task accuracy (routed adapters
    vs the base model, the multi-task adapter and oracle routing) on held-out tasks."""
    library = AdapterLibrary(library_ref.path)
    rows: list[dict] = []
    figures: dict[str, Any] = {"routing_accuracy": {}, "task_accuracy": {}}
    systems = {
        key: AdaptersSelector.load(path, library) for key, path in selectors["saved"].items()
    }
    known = next(iter(systems.values())).names
    tasks = _eval_tasks(params, known)
    prompts = [t.prompt for t in tasks]
    truth = [t.family for t in tasks]
    max_new = MAX_LEN + 2

    def record(system: str, outputs: list[str], routes: list[str] | None) -> float:
        scores = [check(t, o) for t, o in zip(tasks, outputs, strict=True)]
        for i, (t, o, s) in enumerate(zip(tasks, outputs, scores, strict=True)):
            rows.append(
                {
                    "system": system,
                    "family": t.family,
                    "prompt": t.prompt,
                    "answer": t.answer,
                    "route": routes[i] if routes else None,
                    "output": o,
                    "correct": bool(s),
                }
            )
        figures["task_accuracy"][system] = sum(scores) / max(1, len(scores))
        return figures["task_accuracy"][system]

    generator = None
    for key, system in systems.items():
        generator = system.generator()
        routes = generator.route(prompts)
        figures["routing_accuracy"][key] = routing_accuracy(routes, truth)
        record(
            f"routed {key}",
            generator.generate(prompts, max_new_tokens=max_new, routes=routes),
            routes,
        )
    assert generator is not None
    record(
        "oracle routing", generator.generate(prompts, max_new_tokens=max_new, routes=truth), truth
    )
    record("base model", generator.generate_base(prompts, max_new_tokens=max_new), None)
    if (Path(library_ref.path) / MULTITASK).is_dir():
        from peft import PeftModel

        from flywheel.selectors.adapters import load_base

        base, tok = load_base(library.base_model)
        multi = PeftModel.from_pretrained(base, str(Path(library_ref.path) / MULTITASK)).eval()
        record("multi-task adapter", generate_greedy(multi, tok, prompts, max_new), None)
    if plan["mode"] == "add":
        # old tasks, routed by the selector before the add and after it
        old_tasks = [t for t in tasks if t.family != params.add]
        before_lib = AdapterLibrary(plan["library"].path)
        for kind in plan["names"]:
            before = AdaptersSelector.load(Path(plan["selector"].path) / kind, before_lib)
            old_prompts = [t.prompt for t in old_tasks]
            outs = before.generator().generate(old_prompts, max_new_tokens=max_new)
            acc_before = sum(check(t, o) for t, o in zip(old_tasks, outs, strict=True))
            after = [r for r in rows if r["system"] == f"routed {kind}/updated"]
            acc_after = sum(r["correct"] for r in after if r["family"] != params.add)
            figures[f"old tasks routed accuracy {kind}"] = {
                "before": acc_before / max(1, len(old_tasks)),
                "after": acc_after / max(1, len(old_tasks)),
            }
    ref = write_dataset(
        EVAL_DATASET, rows, produced_by=run_id, inputs=[selectors["samples"], library_ref]
    )
    figures["dataset"] = f"{ref.name}@{ref.version}"
    figures["eval_tasks"] = len(tasks)
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
    started = time.monotonic()
    with tracked_run("selectors/kmeans", params.model_dump(mode="json")) as run_id:
        plan = check_inputs(params)
        tasks = None
        if plan["mode"] == "remove":
            library = plan["library"]  # removing changes the selector only
        else:
            families = [params.add] if plan["mode"] == "add" else plan["families"]
            tasks = task_data(params, families)
            library = train_adapters(params, plan, tasks, run_id)
        selectors = train_selectors(params, plan, tasks, library, run_id)
        figures = evaluate(params, plan, library, selectors, run_id)
        selector = publish_selector(params, plan, library, selectors, figures, run_id)
        shutil.rmtree(_workdir(run_id), ignore_errors=True)
        summary = {
            "mode": plan["mode"],
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
            "seconds": round(time.monotonic() - started, 2),
        }
        summary_artifact("selectors-kmeans", "k-means adapter selector", summary)
        return {
            "adapters": library.model_dump(),
            "selector": selector.model_dump(),
            "figures": figures,
            "summary": summary,
        }
