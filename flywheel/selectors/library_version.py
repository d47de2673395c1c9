"""Building one version of an adapter library in the store: an adapter per new task,
reused from an earlier version when one was trained with the same key (data, settings,
base model and code), the previous version's adapters copied byte-identically on add,
and the multi-task baseline (one adapter on every task's data) beside them."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.llm import BackendSpec, model_fingerprint
from flywheel.llm import training as training_module
from flywheel.selectors import adapters as adapters_module
from flywheel.selectors import kmeans as kmeans_module
from flywheel.selectors.adapters import AdapterLibrary, LoraTraining, train_lora
from flywheel.store import list_model_versions, read_model

MULTITASK = "_multitask"  # the baseline's folder in a library version; never an adapter name
# the code an adapter's training depends on: a change to it retrains instead of reusing
SOURCE = hashlib.sha256(
    b"".join(
        Path(m.__file__).read_bytes() for m in (adapters_module, kmeans_module, training_module)
    )
).hexdigest()


def adapter_key(
    what: str, pairs: list[tuple[str, str]], training: LoraTraining, base_model: str
) -> str:
    """What an adapter's weights depend on: its name, data, settings, base model and code."""
    parts = [
        what,
        hashlib.sha256(json.dumps(pairs).encode()).hexdigest(),
        training.model_dump_json(),
        model_fingerprint(BackendSpec(model=base_model)),
        SOURCE,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def earlier_adapter(key: str, library_model: str) -> Path | None:
    """A folder of an adapter trained before with the same key, newest version first."""
    for version in reversed(list_model_versions(library_model)):
        folder = Path(read_model(library_model, version).path)
        index = json.loads((folder / "library.json").read_text())
        for name, info in {**index["adapters"], **index.get("baselines", {})}.items():
            if info.get("key") == key:
                return folder / name
    return None


@dataclass(frozen=True)
class LibraryBuild:
    """One library version's settings; called with a folder (as `save_model_version` calls
    its `build`), it fills the folder: `previous`'s adapters copied (add) or a new library,
    an adapter per task of `data` not in it yet, and with `multitask` the baseline trained
    on every task's data. The call returns the version's figures."""

    library_model: str
    base_model: str
    data: dict[str, list[tuple[str, str]]]
    training: LoraTraining
    previous: str | Path | None = None
    multitask: LoraTraining | None = None

    def __call__(self, folder: Path) -> dict:
        if self.previous is not None:
            library = AdapterLibrary(self.previous).copy_to(folder)
        else:
            library = AdapterLibrary.create(folder, self.base_model)
        figures: dict[str, Any] = {"adapters": {}}
        for name, examples in self.data.items():
            key = adapter_key(name, examples, self.training, self.base_model)
            info = {"key": key, "train_examples": len(examples)}
            if name in library.names:
                # removed from the selector earlier, still in the library: route to it again
                pass
            elif earlier := earlier_adapter(key, self.library_model):
                library.add(name, earlier, {**info, "reused_from": str(earlier)})
            else:
                library.train(name, examples, self.training, info)
            figures["adapters"][name] = library.info(name)
        if (multitask := self.multitask) is not None:
            every = [pair for pairs in self.data.values() for pair in pairs]
            key = adapter_key("multitask:" + ",".join(self.data), every, multitask, self.base_model)
            if earlier := earlier_adapter(key, self.library_model):
                shutil.copytree(earlier, folder / MULTITASK)
                stats: dict = {"reused_from": str(earlier)}
            else:
                stats = train_lora(self.base_model, every, folder / MULTITASK, multitask)
            index = json.loads((folder / "library.json").read_text())
            index["baselines"] = {MULTITASK: {"key": key, "steps": multitask.steps, "train": stats}}
            (folder / "library.json").write_text(json.dumps(index, indent=2, default=str))
            figures["multitask"] = index["baselines"][MULTITASK]
        figures["names"] = library.names
        return json.loads(json.dumps(figures, default=str))


# the name flows build a library version with: library_builder(library_model, base_model, ...)
library_builder = LibraryBuild


__all__ = [
    "MULTITASK",
    "SOURCE",
    "LibraryBuild",
    "adapter_key",
    "earlier_adapter",
    "library_builder",
]
