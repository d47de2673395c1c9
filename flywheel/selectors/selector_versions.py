"""Selector versions in the store: what an add or remove updates (the latest selector and
its library version, checked against the run's name and tasks), the k-means and random
selectors of a fresh run or the latest ones updated, each with the rows of the samples
it was trained on, and the published version's folder (one folder per kind)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flywheel.selectors.adapters import AdapterLibrary, PromptEmbedder
from flywheel.selectors.kmeans import (
    SELECTOR_FILE,
    AdaptersSelector,
    SelectorConfig,
    select_samples,
)
from flywheel.store import ModelNotRegistered, read_model

Label = Callable[[str], dict[str, str]]  # a task name -> the columns naming it in a row


def update_plan(
    add: str | None,
    remove: str | None,
    source: str,
    selector_model: str,
    library_model: str,
    default_source: str,
) -> dict[str, Any]:
    """For an add or remove (none: {}), the latest selector version, its library version,
    {kind: names} and the tasks to train (add: the added one). The selector must have been
    trained on the tasks of `source` (`default_source`: the tasks a null tasks_dataset
    stands for), and must not route to `add` yet, or must route to `remove` and another."""
    if add is None and remove is None:
        return {}
    mode, name = ("add", add) if add is not None else ("remove", remove)
    try:
        selector = read_model(selector_model)
    except ModelNotRegistered as e:
        raise ValueError(
            f"{mode}: there is no {selector_model} to update yet; run selectors/kmeans "
            f"without add/remove first ({e})"
        ) from e
    meta = selector.meta
    trained_on = meta["metrics"].get("tasks_dataset", default_source)
    if trained_on != source:
        raise ValueError(
            f"tasks_dataset: {selector_model}@{selector.version} was trained on the tasks of "
            f"{trained_on!r}, this run names {source!r}; give tasks_dataset "
            f"{None if trained_on == default_source else trained_on!r} to {mode} an adapter"
        )
    entry = next(i for i in meta["inputs"] if i["name"] == library_model)
    library = read_model(library_model, entry["version"])
    names = meta["metrics"]["names"]
    known = next(iter(names.values()))
    if mode == "add" and name in known:
        raise ValueError(
            f"add: {selector_model}@{selector.version} already routes to {name!r} "
            f"(known: {known}); remove it first or add another task"
        )
    if mode == "remove" and name not in known:
        raise ValueError(
            f"remove: {selector_model}@{selector.version} routes to no adapter "
            f"{name!r}; known: {known}"
        )
    if mode == "remove" and len(known) == 1:
        raise ValueError(f"remove: {name!r} is the selector's only adapter; add another first")
    tasks = [name] if mode == "add" else []
    return {"mode": mode, "selector": selector, "library": library, "names": names, "tasks": tasks}


def _config(config: SelectorConfig, kind: str, selection: str) -> SelectorConfig:
    return SelectorConfig(**{**config.model_dump(), "kind": kind, "selection": selection})


def train_fresh(
    library: AdapterLibrary,
    prompts: Mapping[str, Sequence[str]],
    config: SelectorConfig,
    kinds: Sequence[str],
    work: Path,
    label: Label,
) -> tuple[dict[str, str], dict[str, Any], list[dict]]:
    """k-means and random selectors of each kind, each selection's samples shared by the
    kinds; saved under `work/<kind>/<selection>`. Returns ({kind/selection: folder},
    {kind/selection: training stats}, sample rows)."""
    embedder = PromptEmbedder(library.base_model)
    saved: dict[str, str] = {}
    stats: dict[str, Any] = {}
    rows: list[dict] = []
    for selection in ("kmeans", "random"):
        samples = select_samples(prompts, embedder, **config.sampling_kwargs(selection=selection))
        rows += [
            {**label(t), "prompt": p, "selection": selection, "rank": r}
            for t, ps in samples.items()
            for r, p in enumerate(ps)
        ]
        for kind in kinds:
            system = AdaptersSelector.from_samples(
                library, samples, _config(config, kind, selection), embedder
            )
            stats[f"{kind}/{selection}"] = system.selector.stats
            saved[f"{kind}/{selection}"] = str(system.save(work / kind / selection))
    return saved, stats, rows


def update_selectors(
    previous: str | Path,
    kinds: Sequence[str],
    library: AdapterLibrary,
    work: Path,
    label: Label,
    add: str | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    remove: str | None = None,
) -> tuple[dict[str, str], dict[str, Any], list[dict]]:
    """The selectors of each kind in `previous` with `add` added (from its `prompts`) or
    `remove` removed; saved under `work/<kind>/updated`. Returns as `train_fresh`."""
    saved: dict[str, str] = {}
    stats: dict[str, Any] = {}
    rows: list[dict] = []
    for kind in kinds:
        system = AdaptersSelector.load(Path(previous) / kind, library)
        if add is not None:
            stats[kind] = system.add_adapter(add, library.path(add), (prompts or {})[add])
        else:
            stats[kind] = system.remove_adapter(remove)
        saved[f"{kind}/updated"] = str(system.save(work / kind / "updated"))
        rows += [
            {**label(t), "prompt": p, "selection": f"{kind}:kmeans", "rank": r}
            for t, ps in system.selector.samples.items()
            for r, p in enumerate(ps)
        ]
    return saved, stats, rows


def publish_folder(
    folder: Path, saved: Mapping[str, str], *, mode: str, library: str, training: dict, **figures
) -> dict:
    """Copy the k-means (or updated) selector of each kind from `saved` into
    `folder/<kind>`; returns the version's figures: mode, {kind: names}, the library
    version, the training stats and `figures`."""
    names = {}
    for key, path in saved.items():
        if key.endswith("/kmeans") or key.endswith("/updated"):
            kind = key.split("/")[0]
            shutil.copytree(path, folder / kind)
            names[kind] = json.loads((folder / kind / SELECTOR_FILE).read_text())["names"]
    meta = {"mode": mode, "names": names, "library": library, "training": training, **figures}
    return json.loads(json.dumps(meta, default=str))


__all__ = ["Label", "publish_folder", "train_fresh", "update_plan", "update_selectors"]
