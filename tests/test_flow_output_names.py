"""Dataset and model names that flows derive from their parameters are checked when the
parameters are: a name the run could only refuse at its end is refused before it starts."""

import pytest
from pydantic import ValidationError

from flywheel.flows.align import GroupRobustParams
from flywheel.flows.armap import ArmapSynthParams
from flywheel.flows.decode import CollabParams, CoLLMParams, HybridParams
from flywheel.flows.plan import BestOfNParams, MCTSParams, ReflexionParams
from flywheel.flows.relabel import RelabelParams
from flywheel.flows.reward import RewardTrainParams
from flywheel.flows.synth import ReferenceSynthParams


def refused(params_class, **kwargs) -> str:
    with pytest.raises(ValidationError) as info:
        params_class(**kwargs)
    return str(info.value)


def test_reference_synth_output_leaves_room_for_feedback_and_failed():
    # writes <output>, <output>_feedback and <output>__failed
    assert ReferenceSynthParams(output="a" * 54).output == "a" * 54
    message = refused(ReferenceSynthParams, output="a" * 55)
    assert "output: " in message and "output may have at most 54 characters" in message
    assert "gives the dataset name 'x__failed_feedback'" in refused(
        ReferenceSynthParams, output="x__failed"
    )


def test_armap_output_leaves_room_for_failed_and_the_reward_model():
    # writes <output> and <output>__failed, trains <output>-rm
    assert ArmapSynthParams(output="a" * 55).output == "a" * 55
    message = refused(ArmapSynthParams, output="a" * 56)
    assert "output: " in message and "output may have at most 55 characters" in message


@pytest.mark.parametrize("params_class", [BestOfNParams, ReflexionParams, MCTSParams])
def test_plan_output_is_a_valid_dataset_name(params_class):
    assert params_class(output="a" * 63).output == "a" * 63
    assert params_class().output is None  # derived from the planner's name
    message = refused(params_class, output="a" * 64)
    assert "output: invalid dataset name" in message and "(64 characters)" in message
    assert "output: invalid dataset name 'plans\\n'" in refused(params_class, output="plans\n")


@pytest.mark.parametrize("params_class", [CoLLMParams, HybridParams, CollabParams])
def test_decode_output_is_a_valid_dataset_name(params_class):
    assert params_class(output="a" * 63).output == "a" * 63
    message = refused(params_class, output="a" * 64)
    assert message.splitlines()[1] == "output" and "(64 characters)" in message


def test_co_llm_model_name_leaves_room_for_the_eta_sweep_version():
    # the sweep's version is <model_name>_<model version>_<8 hex digits>
    assert CoLLMParams(model_name="m" * 42).model_name == "m" * 42
    message = refused(CoLLMParams, model_name="m" * 43)
    assert "model_name: " in message and "model_name may have at most 42 characters" in message
    assert "model_name: invalid model name 'co-llm\\n'" in refused(
        CoLLMParams, model_name="co-llm\n"
    )


def test_reward_dataset_leaves_room_for_the_derived_model_name():
    assert RewardTrainParams(dataset="a" * 60).model_name == "a" * 60 + "-rm"
    message = refused(RewardTrainParams, dataset="a" * 61)
    assert "dataset: " in message and "dataset may have at most 60 characters" in message
    assert "or set model_name" in message
    assert RewardTrainParams(dataset="a" * 61, model_name="rm").model_name == "rm"
    ensemble = refused(RewardTrainParams, dataset="a" * 54, kind="ensemble", members=3)
    assert "'" + "a" * 54 + "-ensemble3'" in ensemble and "at most 53 characters" in ensemble


def test_align_names_leave_room_for_the_model_and_its_evaluation_version():
    # the model is <dataset>-<method>; its evaluation version is <model_name>_<model version>
    assert GroupRobustParams(dataset="a" * 44).model_name == "a" * 44 + "-gr-dpo"
    message = refused(GroupRobustParams, dataset="a" * 45)
    assert "dataset: " in message and "dataset may have at most 44 characters" in message
    too_long = refused(GroupRobustParams, dataset="a" * 57)
    assert "gives the model name" in too_long and "at most 56 characters" in too_long
    assert GroupRobustParams(model_name="m" * 51).model_name == "m" * 51
    named = refused(GroupRobustParams, model_name="m" * 52)
    assert "model_name: " in named and "model_name may have at most 51 characters" in named


def test_relabel_queue_and_ensemble_names_are_checked():
    assert RelabelParams(queue="a" * 63).queue == "a" * 63
    queue = refused(RelabelParams, queue="a" * 64)
    assert queue.splitlines()[1] == "queue" and "(64 characters)" in queue
    ensemble = refused(RelabelParams, ensemble="my-ensemble\n")
    assert "ensemble: invalid model name 'my-ensemble\\n'" in ensemble


def test_relabel_and_align_outputs_are_parameters_checked_up_front():
    # fixed names before: two users' runs wrote the same relabel_* and align_group_eval
    params = RelabelParams(candidates_dataset="mine_candidates", labeled_dataset="mine_labeled")
    assert (params.candidates_dataset, params.labeled_dataset) == (
        "mine_candidates",
        "mine_labeled",
    )
    # labeled_dataset also writes <name>__failed
    assert "labeled_dataset may have at most 55 characters" in refused(
        RelabelParams, labeled_dataset="a" * 56
    )
    assert "candidates_dataset: invalid dataset name" in refused(
        RelabelParams, candidates_dataset="bad name"
    )
    assert GroupRobustParams(evaluation_dataset="mine_eval").evaluation_dataset == "mine_eval"
    assert "evaluation_dataset: invalid dataset name" in refused(
        GroupRobustParams, evaluation_dataset="x\n"
    )


def test_co_llm_on_own_prompts_needs_own_examples():
    # before, it quietly trained and swept on world examples
    message = refused(CoLLMParams, prompts="my_prompts")
    assert "train_dataset: required when prompts is your own dataset" in message
    message = refused(CoLLMParams, prompts="my_prompts", train_dataset="my_examples")
    assert "validation_dataset: required" in message
    assert CoLLMParams(prompts="my_prompts", train_dataset="my_examples", eta=0.5).eta == 0.5
