"""UGDA on real tiny models: policy pairs, ensemble variance, per-sample gradients,
random projection, selection arms, and refinement from a saved ensemble."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence

import pytest
import torch
from pydantic import ValidationError

from flywheel.llm.base import Backend, TokenLogprob
from flywheel.reward_models import ugda
from flywheel.reward_models.ensemble import (
    HEADS_FILE,
    EnsembleConfig,
    EnsembleRewardModel,
    encoder_for,
    load_ensemble,
    score_pairs,
    train_ensemble,
)
from flywheel.world.labelers import WorldOracleLabeler
from flywheel.world.tasks import MAX_LEN, answer_preference_pairs, sample_tasks


class ScriptedPolicy(Backend):
    """Answers from a fixed list, in order: pins what policy_pairs does with them."""

    model = "scripted-policy"

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    def generate(self, prompts: Sequence[str], **kwargs) -> list[str]:
        assert len(prompts) == len(self.answers)
        return list(self.answers)

    def score(self, prompts, completions) -> list[list[float]]:
        raise NotImplementedError

    def next_token_topk(self, prefixes, k: int = 5) -> list[list[TokenLogprob]]:
        raise NotImplementedError


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than two threads on 2 busy cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setting(world_models, tmp_path_factory, one_thread) -> dict:
    """A small pre-shift ensemble and unlabeled pairs from world-small at temperature 1.5."""
    from flywheel.llm import TransformersBackend

    work = tmp_path_factory.mktemp("ugda")
    original = answer_preference_pairs(320, random.Random(0))
    config = EnsembleConfig(
        base_model=str(world_models / "world-small"), members=3, epochs=1.0, seed=0
    )
    train_ensemble(original, answer_preference_pairs(40, random.Random(1)), config, work / "init")
    tasks = sample_tasks(160, random.Random(7))
    with TransformersBackend(world_models / "world-small", batch_size=64) as policy:
        prompts = [t.prompt for t in tasks]
        sampling = {"temperature": 1.5, "max_new_tokens": MAX_LEN + 2}
        pairs, report = ugda.policy_pairs(policy, prompts[:120], seed=0, **sampling)
        val_pairs, _ = ugda.policy_pairs(policy, prompts[120:], seed=1, **sampling)
    validation, _ = WorldOracleLabeler().label(val_pairs)
    return {
        "work": work,
        "init": work / "init",
        "original": original,
        "candidates": pairs,
        "report": report,
        "validation": validation,
    }


def test_policy_pairs_skip_identical_and_empty_and_report_them(setting) -> None:
    policy = ScriptedPolicy(["ab", "ab", "ab", "ba", "", "x", "ab", "ba", "cd", "dc"])
    pairs, report = ugda.policy_pairs(
        policy, ["p1=", "p2=", "p3=", "p2=", "p4="], seed=0, max_new_tokens=4
    )
    assert [(p["prompt"], p["response_a"], p["response_b"]) for p in pairs] == [
        ("p2=", "ab", "ba"),
        ("p4=", "cd", "dc"),
    ]
    assert report == {
        "prompts": 5,
        "pairs": 2,
        "identical": 1,
        "empty_response": 1,
        "repeated": 1,
    }
    assert len({p["id"] for p in pairs}) == 2
    with pytest.raises(ValueError, match="temperature"):
        ugda.policy_pairs(policy, ["p="], temperature=0, max_new_tokens=4)

    # the real tiny policy: every prompt is accounted for
    real = setting["report"]
    assert real["prompts"] == 120 and real["pairs"] > 40
    assert real["pairs"] + real["identical"] + real["empty_response"] + real["repeated"] == 120
    assert all(p["response_a"] != p["response_b"] for p in setting["candidates"])


def test_uncertainty_is_the_variance_of_member_preferences(setting) -> None:
    pairs = setting["candidates"][:30]
    ensemble = EnsembleRewardModel(setting["init"])
    tok, model = ensemble.tok, ensemble.model
    prefs = ugda.pair_preferences(setting["init"], pairs)
    prompts = [p["prompt"] for p in pairs]
    r_a = score_pairs(model, tok, prompts, [p["response_a"] for p in pairs])
    r_b = score_pairs(model, tok, prompts, [p["response_b"] for p in pairs])
    manual = torch.sigmoid(r_a - r_b)
    assert torch.allclose(torch.tensor(prefs["members"]), manual, atol=1e-6)
    assert torch.allclose(torch.tensor(prefs["variance"]), manual.var(dim=1, unbiased=False))
    assert max(prefs["variance"]) > 0
    # the uncertainty arm takes the highest variances, in order
    config = ugda.UgdaConfig(arm="uncertainty", budget=5)
    chosen = ugda.select(prefs["variance"], None, config)
    assert chosen == sorted(range(30), key=lambda i: -prefs["variance"][i])[:5]
    # members that are the same function do not disagree anywhere
    with torch.no_grad():
        model.heads.weight[1:] = model.heads.weight[0]
        model.heads.bias[1:] = model.heads.bias[0]
    same = ugda.pair_preferences(ensemble, pairs)
    assert max(same["variance"]) < 1e-10


@pytest.mark.parametrize("params", ["heads", "heads+last_layer"])
def test_per_sample_gradients_equal_single_sample_backward(setting, params) -> None:
    tok, model, _ = load_ensemble(setting["init"])
    rows = setting["original"][:5]
    batched = ugda.per_sample_grads(model, tok, rows, params, batch_size=5)
    parameters = ugda.gradient_parameters(model, params)
    assert batched.shape == (5, sum(p.numel() for p in parameters))
    for i in (1, 3):
        model.zero_grad()
        row = rows[i]
        encoder = encoder_for(model, tok)
        seqs, _ = encoder.encode([row["prompt"]] * 2, [row["chosen"], row["rejected"]])
        ugda.pairwise_loss(model(**encoder.batch(seqs, "cpu")), 1).sum().backward()
        manual = torch.cat([p.grad.flatten() for p in parameters])
        assert manual.abs().max() > 1e-4  # a real gradient, not zeros on both sides
        assert torch.allclose(batched[i], manual, atol=1e-6, rtol=1e-4)
    # the other samples' gradients are different vectors
    assert not torch.allclose(batched[1], batched[3])
    # parameters are left as they were (requires_grad restored)
    assert all(p.requires_grad for p in model.parameters())


def test_random_projection_is_deterministic_per_seed_and_keeps_cosines() -> None:
    grads = torch.randn(6, 5000)
    first = ugda.RandomProjection(5000, 2048, seed=3, block=1536)(grads)
    again = ugda.RandomProjection(5000, 2048, seed=3, block=1536)(grads)
    other = ugda.RandomProjection(5000, 2048, seed=4, block=1536)(grads)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # a row projected alone equals the same row projected in a batch
    alone = ugda.RandomProjection(5000, 2048, seed=3, block=1536)(grads[2:3])
    assert torch.allclose(alone[0], first[2], atol=1e-4)
    mixed = grads[1] + 0.5 * grads[0]
    before = torch.nn.functional.cosine_similarity(grads[0], mixed, dim=0)
    proj = ugda.RandomProjection(5000, 2048, seed=3, block=1536)(torch.stack([grads[0], mixed]))
    after = torch.nn.functional.cosine_similarity(proj[0], proj[1], dim=0)
    assert abs(before - after) < 0.08
    gaussian = ugda.RandomProjection(5000, 64, seed=3, kind="gaussian")(grads)
    assert gaussian.shape == (6, 64)
    with pytest.raises(ValueError, match="expects 5000"):
        ugda.RandomProjection(5000, 64)(torch.randn(2, 10))


def test_selection_respects_budget_and_fraction_in_every_arm() -> None:
    n = 40
    variance = [((i * 7) % n) / n for i in range(n)]  # a permutation of 0..39 / 40
    influence = [((i * 13) % n) / n for i in range(n)]
    top_variance = sorted(range(n), key=lambda i: -variance[i])
    config = ugda.UgdaConfig(budget=4, uncertain_fraction=0.25)
    chosen = ugda.select(variance, influence, config)
    pool = top_variance[:10]
    assert len(chosen) == 4 and set(chosen) <= set(pool)
    assert chosen == sorted(pool, key=lambda i: -influence[i])[:4]
    # influence outside the pool is not needed
    sparse = [influence[i] if i in pool else None for i in range(n)]
    assert ugda.select(variance, sparse, config) == chosen
    assert (
        ugda.select(variance, None, config.model_copy(update={"arm": "uncertainty"}))
        == (top_variance[:4])
    )
    rand = ugda.select(variance, None, config.model_copy(update={"arm": "random"}))
    assert len(set(rand)) == 4 and rand == ugda.select(
        variance, None, config.model_copy(update={"arm": "random"})
    )
    assert ugda.select(variance, None, config.model_copy(update={"arm": "none"})) == []
    with pytest.raises(ValueError, match="influence score"):
        ugda.select(variance, None, config)

    with pytest.raises(ugda.UgdaConfigError, match=r"^budget: 50 is more than the 40"):
        ugda.select(variance, influence, config.model_copy(update={"budget": 50}))
    with pytest.raises(ugda.UgdaConfigError, match=r"^uncertain_fraction: 0.25 keeps 10 of 40"):
        ugda.select(variance, influence, config.model_copy(update={"budget": 12}))
    for field, value in (("budget", 0), ("uncertain_fraction", 1.5), ("arm", "greedy")):
        with pytest.raises(ValidationError, match=field):
            ugda.UgdaConfig(**{field: value})


def test_each_arm_runs_a_round_and_refines_from_the_saved_ensemble(setting) -> None:
    oracle = WorldOracleLabeler()
    candidates, work = setting["candidates"], setting["work"]
    evaluation = answer_preference_pairs(20, random.Random(2))
    base = ugda.UgdaConfig(
        budget=12,
        uncertain_fraction=0.5,
        projection_dim=128,
        refine_epochs=1.0,
        refine_batch_size=8,
        seed=0,
    )
    results = {}
    for arm in ugda.ARMS:
        config = base.model_copy(update={"arm": arm})
        out = work / f"round-{arm.replace('+', '_')}"
        results[arm] = ugda.ugda_round(
            setting["init"],
            candidates,
            setting["validation"],
            oracle,
            setting["original"],
            evaluation,
            config,
            out,
        )
    assert results["none"]["selected_ids"] == [] and results["none"]["refine"] is None
    assert results["none"]["ensemble"] == str(setting["init"])
    by_id = {c["id"]: i for i, c in enumerate(candidates)}
    ugda_result = results["uncertainty+influence"]
    variance = ugda_result["variance"]
    pool = set(
        sorted(range(len(candidates)), key=lambda i: -variance[i])[
            : math.ceil(0.5 * len(candidates))
        ]
    )
    assert {by_id[i] for i in ugda_result["selected_ids"]} <= pool
    assert sum(v is not None for v in ugda_result["influence"]) == len(pool)
    for arm in ("uncertainty+influence", "uncertainty", "random"):
        result = results[arm]
        assert len(result["selected_ids"]) == 12
        assert len(result["labeled"]) + len(result["failures"]) == 12
        assert result["refine"]["relabeled"] == len(result["labeled"])
        # saved figures say where training started
        meta = json.loads((work / f"round-{arm.replace('+', '_')}" / "ensemble.json").read_text())
        assert meta["init_from"] == str(setting["init"].absolute())
        EnsembleRewardModel(result["ensemble"])  # loads as any ensemble


def test_refinement_continues_from_the_saved_weights(setting, world_models) -> None:
    init, work = setting["init"], setting["work"]
    labeled, _ = WorldOracleLabeler().label(setting["candidates"][:30])
    config = ugda.UgdaConfig(refine_epochs=1.0, refine_lr=1e-6, refine_batch_size=8)
    figures = ugda.refine(init, labeled, setting["original"], labeled, config, work / "tiny-step")
    assert figures["init_from"] == str(init.absolute()) and figures["relabeled"] == len(labeled)
    assert figures["replayed"] == len(labeled)
    saved = torch.load(init / HEADS_FILE, weights_only=True)
    refined = torch.load(work / "tiny-step" / HEADS_FILE, weights_only=True)
    # a fresh start: the same config without init_from gives new heads on world-small
    fresh_dir = work / "fresh"
    train_ensemble(
        labeled,
        labeled,
        EnsembleConfig(
            base_model=str(world_models / "world-small"),
            members=3,
            epochs=1.0,
            learning_rate=1e-6,
            batch_size=8,
        ),
        fresh_dir,
    )
    fresh = torch.load(fresh_dir / HEADS_FILE, weights_only=True)
    near = (refined["weight"] - saved["weight"]).abs().max()
    far = (fresh["weight"] - saved["weight"]).abs().max()
    assert near < 1e-3 < far
    _, refined_model, _ = load_ensemble(work / "tiny-step")
    _, fresh_model, _ = load_ensemble(fresh_dir)
    _, init_model, _ = load_ensemble(init)
    name, init_param = next(iter(init_model.backbone.named_parameters()))
    refined_param = dict(refined_model.backbone.named_parameters())[name]
    fresh_param = dict(fresh_model.backbone.named_parameters())[name]
    assert (refined_param - init_param).abs().max() < 1e-3
    assert (fresh_param - init_param).abs().max() > 1e-3  # the pre-shift training moved it
    with pytest.raises(ValueError, match="set members=3"):
        train_ensemble(
            labeled,
            labeled,
            EnsembleConfig(base_model=str(init), members=4),
            work / "wrong",
            init_from=init,
        )
    with pytest.raises(ValueError, match="no relabeled pairs"):
        ugda.refine(init, [], setting["original"], labeled, config, work / "nothing")
