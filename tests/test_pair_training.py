"""The pieces the pair-training flows share: method configs built from flow parameters,
the base-model check, the code hash behind reuse, the relabel judge rule, and the
group-robust report tables."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel.alignment import group_robust
from flywheel.alignment.group_reports import evaluation_markdown, length_by_split
from flywheel.alignment.group_robust import GroupRobustConfig
from flywheel.flows.align import GroupRobustParams
from flywheel.flows.pair_training import check_base_model, code_hash, config_from
from flywheel.flows.relabel import RelabelParams
from flywheel.flows.reward import RewardTrainParams
from flywheel.reward_models.bradley_terry import RewardTrainingConfig
from flywheel.reward_models.ensemble import EnsembleConfig


def test_a_config_takes_the_parameters_of_its_field_names(tmp_path: Path) -> None:
    params = RewardTrainParams(
        base_model=str(tmp_path), epochs=0.5, batch_size=4, max_length=64, seed=9, members=5
    )
    config = config_from(RewardTrainingConfig, params)
    for field in ("base_model", "epochs", "batch_size", "max_length", "seed", "over_length"):
        assert getattr(config, field) == getattr(params, field)
    # a field the flow does not set keeps the method's default
    assert (
        config.center_rewards_coefficient
        == RewardTrainingConfig.model_fields["center_rewards_coefficient"].default
    )
    assert config_from(EnsembleConfig, params).members == 5


def test_the_group_robust_config_overrides_the_method_only(tmp_path: Path) -> None:
    params = GroupRobustParams(base_model=str(tmp_path), method="gr-ipo", beta=0.3, chi=0.5)
    plain = params.config("ipo")
    assert plain.method == "ipo" and not plain.robust and plain.loss == "ipo"
    assert (plain.beta, plain.chi, plain.base_model) == (0.3, 0.5, str(tmp_path))
    assert params.config(params.method).robust
    assert plain.max_steps == GroupRobustConfig.model_fields["max_steps"].default


def test_the_base_model_check_names_the_field_and_what_to_pass(tmp_path: Path) -> None:
    check_base_model(str(tmp_path), "policy")
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"base_model: no model folder at .*pass a policy"):
        check_base_model(missing, "policy")
    # a hub name is taken only where the method can load one
    check_base_model("org/model", "backbone", hub_name_ok=True)
    with pytest.raises(FileNotFoundError, match="pass a backbone folder"):
        check_base_model("org/model", "backbone")
    with pytest.raises(FileNotFoundError):
        check_base_model("./org", "backbone", hub_name_ok=True)


def test_the_code_hash_is_the_hash_of_the_method_sources() -> None:
    # the same formula as before it was shared: models trained earlier are still reused
    expected = hashlib.sha256(Path(group_robust.__file__).read_bytes()).hexdigest()
    assert code_hash(group_robust) == expected


def test_relabel_with_an_llm_labeler_needs_a_judge_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="judge: required when labeler is 'llm'"):
        RelabelParams(labeler="llm")
    judged = RelabelParams(labeler="llm", judge={"model": str(tmp_path)})
    assert judged.judge is not None and judged.judge.model == str(tmp_path)


def test_group_report_tables() -> None:
    counts = {"max_length": 64, "truncated": 2, "dropped": 0, "longest": 80}
    length = {"train": {"all": counts, "by_group": {"a": counts}}, "eval": {"all": counts}}
    assert list(length_by_split(length)) == ["train", "train group a", "eval"]
    rows = [
        {"method": "gr-dpo", "group": "a", "pairs": 3, "accuracy": 0.5, "loss": 0.7,
         "final_group_weight": 0.25},
        {"method": "dpo", "group": "a", "pairs": 3, "accuracy": 1.0, "loss": 0.1,
         "final_group_weight": None},
    ]  # fmt: skip
    table = evaluation_markdown(rows).splitlines()
    assert table[2] == "| gr-dpo | a | 3 | 0.500 | 0.700 | 0.250 |"
    assert table[3] == "| dpo | a | 3 | 1.000 | 0.100 |  |"
