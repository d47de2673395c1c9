"""Group robust DPO/IPO: group weights, per-group losses, absent groups, bad input."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from flywheel.alignment.group_robust import (
    GroupDataError,
    GroupRobustConfig,
    check_groups,
    make_trainer,
    pair_losses,
    plot_history,
    train_group_robust,
)
from flywheel.world.tasks import group_preference_pairs


def rows(n: int, seed: int = 0) -> list[dict]:
    return group_preference_pairs(n, random.Random(seed))


def config(world_models: Path, **kw) -> GroupRobustConfig:
    defaults = dict(base_model=str(world_models / "world-small"), batch_size=16)
    return GroupRobustConfig(**{**defaults, **kw})


def test_pair_losses_match_dpo_and_ipo_formulas():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    lengths = torch.tensor([2, 4])
    loss, margin = pair_losses(chosen, rejected, lengths, lengths, "dpo", beta=0.1)
    assert margin.tolist() == [0.5, -3.0]
    assert loss[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.05))))
    loss, margin = pair_losses(chosen, rejected, lengths, torch.tensor([1, 1]), "ipo", beta=0.5)
    assert margin.tolist() == [pytest.approx(0.0), pytest.approx(-1.5)]
    assert loss.tolist() == [pytest.approx(1.0), pytest.approx(6.25)]


def test_group_weights_move_to_the_group_with_the_larger_loss(world_models, tmp_path):
    """One training step by hand: the group whose pairs the reference model gets wrong
    gains weight; the update is exponentiated gradient on the batch's group losses."""
    data, _ = check_groups(rows(64), "group", "train")
    trainer = make_trainer(data, config(world_models, eta_q=1.0, max_steps=1), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    before = torch.tensor(trainer.group_weights)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    entry = trainer.history[-1]
    after = torch.tensor(trainer.group_weights)
    assert after.sum().item() == pytest.approx(1.0)
    expected = before * torch.exp(torch.tensor([entry["loss"][g] for g in trainer.groups]))
    assert after.tolist() == pytest.approx((expected / expected.sum()).tolist(), rel=1e-5)
    # the robust loss is the weighted mean of the group losses
    group_loss = torch.tensor([entry["loss"][g] for g in trainer.groups])
    assert loss.item() == pytest.approx((after * group_loss).sum().item(), rel=1e-4)
    assert any(p.grad is not None for p in trainer.model.parameters())


def test_a_group_absent_from_the_batch_keeps_its_weight(world_models, tmp_path):
    data, _ = check_groups(rows(64), "group", "train")
    trainer = make_trainer(data, config(world_models, eta_q=1.0, max_steps=1), tmp_path)
    trainer.model.train()
    plain_only = [trainer.train_dataset[i] for i in range(64)]
    plain_only = [e for e in plain_only if trainer.groups[e["group_id"]] == "plain"][:8]
    batch = trainer.data_collator(plain_only)
    trainer.log_q = torch.log(torch.tensor([0.3, 0.7]))
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    weights = trainer.group_weights
    # plain moved up, spaced only by the renormalisation: its log-weight is unchanged
    # relative to the normaliser, so the ratio follows exp(eta * loss_plain) alone
    ratio = (weights[0] / weights[1]) / (0.3 / 0.7)
    assert ratio == pytest.approx(math.exp(trainer.history[-1]["loss"]["plain"]), rel=1e-4)
    assert set(trainer.history[-1]["loss"]) == {"plain"}


def test_gr_dpo_trains_and_reports_every_group(world_models, tmp_path):
    train, held = rows(160, 0), rows(60, 1)
    report = train_group_robust(train, held, config(world_models, epochs=1), tmp_path)
    assert report["steps"] == 10
    assert set(report["held_out"]["groups"]) == {"plain", "spaced"}
    assert report["held_out"]["worst_group"] in {"plain", "spaced"}
    assert len(report["history"]) == 10
    assert sum(report["final_group_weights"].values()) == pytest.approx(1.0)
    assert (tmp_path / "model.safetensors").exists()
    png = plot_history(report["history"], tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_size_adjustment_favours_the_small_group(world_models, tmp_path):
    data, report = check_groups(rows(100), "group", "train")
    trainer = make_trainer(data, config(world_models, size_adjustment=1.0), tmp_path)
    sizes = report["group_sizes"]
    small = min(sizes, key=sizes.get)
    adjustment = dict(zip(trainer.groups, trainer.size_adjustment.tolist(), strict=True))
    assert adjustment[small] == pytest.approx(1 / math.sqrt(sizes[small]))
    assert adjustment[small] > adjustment[max(sizes, key=sizes.get)]


def test_bad_group_data_is_named():
    good = rows(20)
    with pytest.raises(GroupDataError, match="group column 'team' missing"):
        check_groups(good, "team", "train")
    with pytest.raises(GroupDataError, match=r"row\(s\) have an empty 'group' \(e.g. row 3\)"):
        check_groups([*good[:3], {**good[3], "group": ""}], "group", "train")
    with pytest.raises(GroupDataError, match=r"\['experts'\] have no usable pairs"):
        check_groups(good, "group", "train", expected=["plain", "spaced", "experts"])
    plain = [r for r in good if r["group"] == "plain"]
    with pytest.raises(GroupDataError, match="at least two groups"):
        check_groups(plain, "group", "train")
    # a group whose pairs are all unusable counts as a group with no pairs
    spaced_broken = [{**r, "rejected": r["chosen"]} if r["group"] == "spaced" else r for r in good]
    with pytest.raises(GroupDataError, match="at least two groups"):
        check_groups(spaced_broken, "group", "train")
