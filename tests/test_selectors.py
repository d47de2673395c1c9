"""The k-means adapter selector on real peft adapters over the session's world-small."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from flywheel.selectors import (
    AdapterLibrary,
    AdaptersSelector,
    LoraTraining,
    PromptEmbedder,
    SelectorConfig,
    SelectorInputError,
    generate_greedy,
    kmeans_select,
    load_selector,
    new_selector,
    random_select,
    routing_accuracy,
    select_samples,
    selector_config,
    train_lora,
)
from flywheel.selectors import kmeans as kmeans_module
from flywheel.world.tasks import sample_tasks

# peft calls a transformers method that transformers deprecates; nothing to act on here
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
FAMILIES = ["reverse", "sort", "count"]
ADAPTER = LoraTraining(rank=4, steps=40, lr=1e-2, batch_size=16)


def prompts_of(family: str, n: int, seed: int = 0) -> list[str]:
    return [t.prompt for t in sample_tasks(n, random.Random(f"{seed}-{family}"), [family])]


def pairs_of(family: str, n: int) -> list[tuple[str, str]]:
    tasks = sample_tasks(n, random.Random(f"0-{family}"), [family])
    return [(t.prompt, t.answer) for t in tasks]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(world_models: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's world-small trained on for a fixed 500 steps.

    The session fixture trains for a time budget, so on a busy machine it can stop after
    a dozen steps with collapsed embeddings, where no LoRA (the selector's included) can
    learn; a fixed top-up makes these tests independent of the machine's load.
    """
    from transformers import AutoModelForCausalLM

    from flywheel.llm.training import train_causal_lm
    from flywheel.world.bootstrap import world_example
    from flywheel.world.models import char_tokenizer, save_tiny

    model = AutoModelForCausalLM.from_pretrained(world_models / "world-small")
    train_causal_lm(model, char_tokenizer(), world_example, steps=500, batch_size=32, lr=3e-3)
    return str(save_tiny(model, tmp_path_factory.mktemp("base") / "world-small"))


@pytest.fixture(scope="module")
def library(base: str, tmp_path_factory: pytest.TempPathFactory) -> AdapterLibrary:
    lib = AdapterLibrary.create(tmp_path_factory.mktemp("lib") / "library", base)
    for family in FAMILIES:
        lib.train(family, pairs_of(family, 80), ADAPTER)
    return lib


@pytest.fixture(scope="module")
def shift_adapter(base: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained outside the library, for adding."""
    folder = tmp_path_factory.mktemp("shift") / "shift"
    train_lora(base, pairs_of("shift", 80), folder, ADAPTER)
    return folder


@pytest.fixture(scope="module")
def embedder(base: str) -> PromptEmbedder:
    return PromptEmbedder(base)


TASKS = {f: prompts_of(f, 40) for f in FAMILIES}
HELD_OUT = [p for f in FAMILIES for p in prompts_of(f, 15, seed=99)]
HELD_OUT_TRUTH = [f for f in FAMILIES for _ in range(15)]
LORA = dict(kind="lora", k=3, per_centre=2, rank=4, steps=100)
HEAD = dict(kind="head", k=3, per_centre=2)


# --- k-means selection ---


def blobs() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    centres = [np.array([0.0, 0.0]), np.array([10.0, 0.0]), np.array([0.0, 10.0])]
    groups = [c + rng.normal(0, 1, size=(20, 2)) for c in centres]
    return np.concatenate(groups), groups


def test_kmeans_picks_the_samples_nearest_each_centre():
    x, groups = blobs()
    picked = kmeans_select(x, k=3, per_centre=2)
    assert len(picked) == 6 and len(set(picked)) == 6
    # the well separated blobs are the clusters: their means are the centres
    want = set()
    for g, group in enumerate(groups):
        d = np.linalg.norm(group - group.mean(0), axis=1)
        want |= {g * 20 + int(i) for i in np.argsort(d)[:2]}
    assert set(picked) == want
    # rounds: the first k picks are one per centre, so any prefix covers every centre
    assert sorted(i // 20 for i in picked[:3]) == [0, 1, 2]
    assert sorted(i // 20 for i in picked[3:]) == [0, 1, 2]


def test_kmeans_respects_k_per_centre_and_cosine():
    x, _ = blobs()
    x = x + np.array([20.0, 20.0])  # away from the origin, so directions differ
    for k, per_centre in ((1, 1), (2, 5), (5, 3)):
        picked = kmeans_select(x, k=k, per_centre=per_centre, distance="cosine")
        assert len(picked) == k * per_centre == len(set(picked))
    # a one-member cluster leaves its share to the others: the count still holds
    lonely = np.concatenate([np.zeros((9, 2)), [[100.0, 100.0]]])
    lonely[:9] += np.random.default_rng(1).normal(0, 1, size=(9, 2))
    picked = kmeans_select(lonely, k=2, per_centre=3)
    assert len(picked) == 6 and 9 in picked
    assert len(random_select(10, 4, seed=1)) == 4 == len(set(random_select(10, 4, seed=1)))


def test_select_samples_takes_k_times_per_centre_of_each_task(embedder):
    chosen = select_samples(TASKS, embedder, k=3, per_centre=2)
    assert list(chosen) == FAMILIES
    for family, prompts in chosen.items():
        assert len(prompts) == 6 == len(set(prompts))
        assert set(prompts) <= set(TASKS[family])
    other = select_samples(TASKS, embedder, k=3, per_centre=2, selection="random")
    assert other != chosen and all(len(p) == 6 for p in other.values())


# --- adapters ---


def test_adapters_are_saved_and_loaded_by_name_and_generate_differently(library, base):
    for name in FAMILIES:
        assert (library.folder / name / "adapter_config.json").exists()
        assert (library.folder / name / "adapter_model.safetensors").exists()
    model, tok = library.load_model()
    assert set(model.peft_config) == set(FAMILIES)
    prompts = HELD_OUT[:20]
    outputs = {}
    for name in FAMILIES:
        model.set_adapter(name)
        outputs[name] = generate_greedy(model, tok, prompts)
    assert outputs["reverse"] != outputs["sort"] != outputs["count"] != outputs["reverse"]
    # the adapter alone on a fresh base gives what it gave inside the shared model
    from peft import PeftModel

    from flywheel.selectors import load_base

    fresh, _ = load_base(base)
    alone = PeftModel.from_pretrained(fresh, str(library.path("sort"))).eval()
    assert generate_greedy(alone, tok, prompts) == outputs["sort"]


# --- routing ---


@pytest.fixture(scope="module")
def head_system(library, embedder) -> AdaptersSelector:
    return AdaptersSelector.train(library, TASKS, selector_config(**HEAD), embedder)


@pytest.fixture(scope="module")
def lora_system(library, embedder) -> AdaptersSelector:
    return AdaptersSelector.train(library, TASKS, selector_config(**LORA), embedder)


def test_routed_generation_groups_by_adapter_and_keeps_input_order(head_system):
    gen = head_system.generator()
    calls: list[int] = []
    real = gen.model.generate

    def spy(*args, **kwargs):
        calls.append(len(kwargs["input_ids"]))
        return real(*args, **kwargs)

    gen.model.generate = spy
    prompts = HELD_OUT[:6] + HELD_OUT[15:21] + HELD_OUT[30:36]
    routes = ["reverse", "sort", "count"] * 6  # every neighbour goes to another adapter
    outputs = gen.generate(prompts, routes=routes)
    assert sorted(calls) == [6, 6, 6]  # one batched generate per adapter
    for name in FAMILIES:
        idx = [i for i, r in enumerate(routes) if r == name]
        gen.model.set_adapter(name)
        one_by_one = [generate_greedy(real.__self__, gen.tok, [prompts[i]])[0] for i in idx]
        assert [outputs[i] for i in idx] == one_by_one

    calls.clear()
    routed = gen.route(prompts)
    gen.generate(prompts, routes=routed)
    assert len(calls) == len(set(routed))


def test_lora_selector_writes_known_names_and_routes_most_inputs(lora_system, head_system):
    routes = lora_system.route(HELD_OUT)
    assert set(routes) <= set(FAMILIES)
    assert routing_accuracy(routes, HELD_OUT_TRUTH)["all"] >= 0.8
    assert routing_accuracy(head_system.route(HELD_OUT), HELD_OUT_TRUTH)["all"] >= 0.8
    # inside the generator the selector is one more adapter on the shared base
    gen = lora_system.generator()
    assert "_selector" in gen.model.peft_config
    assert gen.route(HELD_OUT) == routes


@pytest.mark.parametrize("kind", ["head", "lora"])
def test_save_and_load_give_the_same_routes(kind, library, embedder, tmp_path, request):
    system = request.getfixturevalue(f"{kind}_system")
    system.save(tmp_path / "sel")
    loaded = AdaptersSelector.load(tmp_path / "sel")
    assert loaded.library.folder == library.folder
    assert loaded.selector.kind == kind and loaded.names == system.names
    assert loaded.selector.samples == system.selector.samples
    assert loaded.route(HELD_OUT) == system.route(HELD_OUT)
    assert load_selector(tmp_path / "sel").route(HELD_OUT[:5]) == system.route(HELD_OUT[:5])


@pytest.mark.parametrize("config", [HEAD, LORA], ids=["head", "lora"])
def test_add_and_remove_update_only_the_selector(
    config, base, library, shift_adapter, embedder, tmp_path
):
    lib = library.copy_to(tmp_path / "lib")
    system = AdaptersSelector.train(lib, TASKS, selector_config(**config), embedder)
    before = {name: lib.digest(name) for name in lib.names}
    shift_prompts = prompts_of("shift", 40)
    report = system.add_adapter("shift", shift_adapter, shift_prompts)
    assert report["selector_samples"] == 6
    assert system.names == [*FAMILIES, "shift"]
    assert {name: lib.digest(name) for name in FAMILIES} == before
    assert lib.digest("shift") == kmeans_module.folder_digest(shift_adapter)
    # the new task is routed to its adapter; the old tasks mostly still to theirs (chance
    # is 1/4; the update replays only old_share of their samples, so some drift is real)
    held_shift = prompts_of("shift", 20, seed=99)
    assert routing_accuracy(system.route(held_shift), ["shift"] * 20)["all"] >= 0.8
    assert routing_accuracy(system.route(HELD_OUT), HELD_OUT_TRUTH)["all"] >= 0.6
    outputs = system.generator().generate(held_shift[:4], routes=["shift"] * 4)
    assert len(outputs) == 4

    system.remove_adapter("reverse")
    assert system.names == ["sort", "count", "shift"]
    assert "reverse" not in system.route(HELD_OUT)
    assert {name: lib.digest(name) for name in FAMILIES} == before  # files kept as they were
    assert "reverse" not in system.generator().model.peft_config


def test_bad_input_names_the_field_before_any_training(library, embedder, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(kmeans_module, "fit_lora", no_training)
    config = selector_config(**LORA)
    cases = [
        ({}, r"tasks: the selector would know no adapters"),
        ({"sort": []}, r"tasks\['sort'\]: the task has no samples"),
        ({"sort": TASKS["sort"][:2]}, r"k=3 is larger than task 'sort''s 2 samples"),
        ({"sort": TASKS["sort"][:4]}, r"k \* per_centre = 6 is more than task 'sort''s 4"),
        ({"nope": TASKS["sort"]}, r"tasks\['nope'\]: no adapter 'nope' in the library"),
    ]
    for tasks, message in cases:
        with pytest.raises(SelectorInputError, match=message):
            AdaptersSelector.train(library, tasks, config, embedder)
    with pytest.raises(SelectorInputError, match=r"kind: Input should be 'lora' or 'head'"):
        selector_config(kind="svm")
    with pytest.raises(SelectorInputError, match=r"kind: unknown selector kind 'svm'"):
        new_selector("svm", library.base_model, SelectorConfig())
    with pytest.raises(SelectorInputError, match=r"distance: Input should be 'euclidean'"):
        selector_config(distance="manhattan")


def test_bad_add_and_remove_name_the_field(head_system, library, tmp_path):
    known = r"known: \['reverse', 'sort', 'count'\]"
    with pytest.raises(
        SelectorInputError, match=r"name: the selector routes to no adapter 'x'; " + known
    ):
        head_system.remove_adapter("x")
    with pytest.raises(SelectorInputError, match=r"adapter_path: .* is not a saved LoRA adapter"):
        head_system.add_adapter("shift", tmp_path, TASKS["sort"])
    with pytest.raises(SelectorInputError, match=r"name: the selector already routes to 'sort'"):
        head_system.add_adapter("sort", library.path("sort"), TASKS["sort"])
    with pytest.raises(SelectorInputError, match=r"name: invalid adapter name 'Shift'"):
        head_system.add_adapter("Shift", library.path("sort"), TASKS["sort"])
    with pytest.raises(SelectorInputError, match=r"new_task_samples\['shift'\]: the task has no"):
        head_system.add_adapter("shift", library.path("sort"), [])
    head_system.save(tmp_path / "sel")
    meta = json.loads((tmp_path / "sel" / "selector.json").read_text())
    meta["names"] = ["shift"]  # a selector that routes to an adapter the library lacks
    (tmp_path / "sel" / "selector.json").write_text(json.dumps(meta))
    with pytest.raises(SelectorInputError, match=r"selector.names: no adapter 'shift' in the"):
        AdaptersSelector.load(tmp_path / "sel")
    assert head_system.names == FAMILIES  # nothing changed by the refused calls


def test_a_selector_never_left_without_adapters(library, embedder):
    system = AdaptersSelector.train(
        library, {"sort": TASKS["sort"]}, selector_config(**HEAD), embedder
    )
    with pytest.raises(SelectorInputError, match=r"would leave the selector knowing no adapters"):
        system.remove_adapter("sort")
    assert system.names == ["sort"]
