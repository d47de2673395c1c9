"""The methods (REFED, the labelers, UGDA) know nothing of the world; the world's part of
each is bound in flows/ and flywheel/world/. These tests pin where each binding lives."""

from __future__ import annotations

import ast
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

import flywheel
from flywheel.flows.synth import (
    REFERENCE,
    WorldRefedConfig,
    make_teacher,
    world_family,
)
from flywheel.llm import Backend, BackendSpec, TokenLogprob
from flywheel.reward_models import ugda
from flywheel.reward_models.labelers import Labeler
from flywheel.synthesis import refed
from flywheel.synthesis.refed import RefedConfig, RefedRun, references_from_rows
from flywheel.world.labelers import WorldOracleLabeler
from flywheel.world.tasks import ONE_SHOT_TEMPLATE, sample_tasks
from flywheel.world.teacher import WorldTeacher

METHODS = ("synthesis/refed.py", "reward_models/labelers.py", "reward_models/ugda.py")


class Echo(Backend):
    """Answers every prompt with the same text (unit tests only)."""

    model = "echo"

    def generate(self, prompts: Sequence[str], **kw) -> list[str]:
        return ["abc"] * len(prompts)

    def score(self, prompts, completions) -> list[list[float]]:
        raise NotImplementedError

    def next_token_topk(self, prefixes, k=5) -> list[list[TokenLogprob]]:
        raise NotImplementedError


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", METHODS)
def test_method_modules_do_not_import_the_world(module: str) -> None:
    imported = imported_modules(Path(flywheel.__file__).parent / module)
    assert not {m for m in imported if m.startswith("flywheel.world")}


def test_refed_defaults_are_neutral_and_the_flow_binds_the_worlds() -> None:
    with pytest.raises(ValidationError, match="responder"):
        RefedConfig(teacher="mine")
    neutral = RefedConfig(responder=BackendSpec(model="m"), teacher="mine")
    assert neutral.response_template != ONE_SHOT_TEMPLATE
    world = WorldRefedConfig()
    assert (world.teacher, world.response_template) == ("world", ONE_SHOT_TEMPLATE)
    assert Path(world.responder.model).name == "world-large"
    # the flow's parameters are the world's config plus where references come from
    assert REFERENCE.defaults.model_dump(include=set(RefedConfig.model_fields)) == (
        world.model_dump()
    )


def test_the_world_teacher_is_built_by_the_flow_only() -> None:
    config = WorldRefedConfig(seed=3)
    teacher = make_teacher(config)
    assert isinstance(teacher, WorldTeacher) and teacher.seed == 3
    with pytest.raises(ValueError, match="teacher: 'world' is not built here"):
        refed.make_teacher(config)


def test_family_column_comes_from_the_callers_function(tmp_path: Path) -> None:
    rows = [t.as_row() for t in sample_tasks(3, random.Random(1))]
    refs = references_from_rows(rows, "w")
    config = WorldRefedConfig(responder=BackendSpec(model="unused"), samples_per_feature=2)

    def run(workdir: Path, **kw) -> list[dict]:
        return RefedRun(refs, config, workdir, WorldTeacher(), Echo, **kw).result()[0]

    plain = run(tmp_path / "plain")
    named = run(tmp_path / "named", family_of=world_family)
    assert plain and {r["family"] for r in plain} == {None}
    assert [r["family"] for r in named] == [r["instruction"].split()[0] for r in named]


def test_world_oracle_is_a_labeler_and_policy_pairs_takes_text() -> None:
    assert isinstance(WorldOracleLabeler(), Labeler)
    [task] = sample_tasks(1, random.Random(0))
    with pytest.raises(TypeError, match=r"prompts: item 0 is a Task, not text"):
        ugda.policy_pairs(Echo(), [task], max_new_tokens=4)
    pairs, report = ugda.policy_pairs(Echo(), [task.prompt], max_new_tokens=4)
    assert (pairs, report["identical"]) == ([], 1)
