"""`selectors/kmeans` on a user's tasks dataset (not the world): English string tasks in a
store dataset with its own column names, on a small Llama built here. One adapter per
task value, the selector trained and evaluated on held-out rows with the chosen scorer,
a task value added and one removed, outputs in the store with lineage; bad input refused
in check-inputs. The model is untrained: these tests check plumbing, never quality."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from flywheel.flows.selectors import KmeansSelectorParams, kmeans_selector
from flywheel.selectors import AdapterLibrary, AdaptersSelector, folder_digest
from flywheel.store import list_datasets, read_dataset, read_model, sql, write_dataset
from flywheel.synthesis.rouge import rouge_l
from tests.helpers.own_models import QUALITIES, TOPICS, build_model, train_tokenizer
from tests.helpers.prefect_reads import lineage_inputs, task_runs

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # peft calls a transformers method that transformers deprecates; nothing to act on here
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),
]

ROWS_PER_TASK = 24
EVAL_FRACTION = 0.25  # 6 held-out rows per task, 18 for training
HELD_OUT = round(EVAL_FRACTION * ROWS_PER_TASK)
DATASET = "string_tasks"


def string_task_rows(seed: int = 0) -> list[dict]:
    """Three simple English string tasks, in columns named as a user might name them."""
    rng = random.Random(seed)
    tasks = {
        "upper": ("Uppercase", str.upper),
        "reverse_words": ("Reverse the words", lambda s: " ".join(reversed(s.split()))),
        "first_word": ("First word of", lambda s: s.split()[0]),
    }
    rows = []
    for skill, (instruction, solve) in tasks.items():
        for i in range(ROWS_PER_TASK):
            text = f"{rng.choice(QUALITIES)} note about {rng.choice(TOPICS)} number {i}"
            rows.append(
                {"input": f"{instruction}: {text} =", "target": solve(text), "skill": skill}
            )
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("own-base")
    tok = train_tokenizer(root / "tokenizer")
    return str(build_model(root / "llama", "llama", tok))


def params(base: str, **kw) -> KmeansSelectorParams:
    defaults = dict(
        base_model=base,
        tasks_dataset=DATASET,
        prompt_column="input",
        answer_column="target",
        task_column="skill",
        tasks=["upper", "reverse_words"],
        eval_fraction=EVAL_FRACTION,
        k=2,
        per_centre=2,
        adapter_steps=4,
        selector_steps=4,
        max_new_tokens=6,
    )
    return KmeansSelectorParams(**{**defaults, **kw})


def test_own_tasks_dataset_train_add_remove(prefect_api, base, data_dir):
    tasks_ref = write_dataset(DATASET, string_task_rows())
    first = ["upper", "reverse_words"]
    kmeans_selector(params(base, scorer="rouge_l"))
    library, selector = read_model("kmeans-adapters"), read_model("kmeans-selector")
    assert AdapterLibrary(library.path).names == first
    metrics = selector.meta["metrics"]
    assert metrics["names"] == {"lora": first, "head": first}
    assert metrics["tasks_dataset"] == DATASET and metrics["scorer"] == "rouge_l"
    assert metrics["eval_tasks"] == HELD_OUT * len(first)
    systems = {
        "routed lora/kmeans",
        "routed lora/random",
        "routed head/kmeans",
        "routed head/random",
        "oracle routing",
        "base model",
        "multi-task adapter",
    }
    assert set(metrics["task_accuracy"]) == systems
    assert all(set(by) == {*first, "all"} for by in metrics["task_accuracy_by_task"].values())
    assert set(metrics["routing_accuracy"]) == {
        "lora/kmeans",
        "lora/random",
        "head/kmeans",
        "head/random",
    }

    # held-out rows of the dataset, scored by ROUGE-L against the answer column
    evaluation = read_dataset("selector_eval").to_pandas()
    assert len(evaluation) == len(systems) * HELD_OUT * len(first)
    assert set(evaluation.task) == set(first)
    assert "family" not in evaluation.columns
    for row in evaluation.itertuples():
        assert row.score == pytest.approx(rouge_l(row.output, row.answer))
    source = {r["input"]: r for r in string_task_rows()}
    for row in evaluation.itertuples():
        assert (source[row.prompt]["target"], source[row.prompt]["skill"]) == (row.answer, row.task)
    samples = read_dataset("selector_samples").to_pandas()
    assert samples.groupby(["selection", "task"]).size().tolist() == [4] * 4
    assert not set(samples.prompt) & set(evaluation.prompt)  # selector never sees held-out rows

    # the published selector routes with the published library
    system = AdaptersSelector.load(Path(selector.path) / "head")
    assert set(system.route(list(evaluation.prompt[:4]))) <= set(first)

    base_input = (Path(base).name, "model")
    assert lineage_inputs("kmeans-adapters", library.version) == {base_input, (DATASET, "dataset")}
    assert lineage_inputs("selector_samples", read_dataset("selector_samples").version) == {
        (DATASET, "dataset")
    }
    assert lineage_inputs("kmeans-selector", selector.version) == {
        base_input,
        ("selector_samples", "dataset"),
        ("kmeans-adapters", "model"),
    }
    assert tasks_ref.version == read_dataset(DATASET).version  # the user's data, not a copy

    # add a task value of the dataset: its adapter trained, the others copied untouched
    kmeans_selector(params(base, add="first_word"))
    library2, selector2 = read_model("kmeans-adapters"), read_model("kmeans-selector")
    for name in first:
        assert folder_digest(Path(library2.path) / name) == folder_digest(Path(library.path) / name)
    metrics2 = selector2.meta["metrics"]
    assert metrics2["mode"] == "add" and metrics2["names"]["lora"] == [*first, "first_word"]
    assert metrics2["scorer"] == "exact_match"
    assert set(metrics2["old tasks routed accuracy head"]) == {"before", "after"}
    evaluation2 = read_dataset("selector_eval").to_pandas()
    assert set(evaluation2.task) == {*first, "first_word"}
    assert set(evaluation2.score) <= {0.0, 1.0}
    for row in evaluation2.itertuples():
        assert row.score == float(row.output.strip() == row.answer.strip())

    # remove: the selector only
    kmeans_selector(params(base, remove="upper"))
    metrics3 = read_model("kmeans-selector").meta["metrics"]
    assert metrics3["names"]["head"] == ["reverse_words", "first_word"]
    assert metrics3["library"] == f"kmeans-adapters@{library2.version}"
    assert set(read_dataset("selector_eval").to_pandas().task) == {"reverse_words", "first_word"}

    # a selector trained on this dataset is not updated from the world's tasks
    with pytest.raises(ValueError, match=r"tasks_dataset: kmeans-selector@\S+ was trained on"):
        kmeans_selector(params(base, tasks_dataset=None, tasks=None, add="copy"))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(prompt_column="question"), r"prompt_column: tasks_dataset string_tasks@\S+ has no "),
        (dict(tasks=["upper"]), r"tasks: 1 task value\(s\) \['upper'\].*at least 2 task values"),
        (dict(tasks=["upper", "spell"]), r"tasks: \['spell'\] are not values of column 'skill'"),
        (dict(k=10, per_centre=2), r"task 'upper' has 24 rows, 18 for training.*k \* per_centre"),
        (dict(add="spell"), r"add: 'spell' is not a value of column 'skill'"),
        (dict(families=["copy"]), r"families: names world task families"),
        (dict(tasks_dataset="missing"), r"tasks_dataset: .*missing"),
        (dict(scorer="reward_model"), r"scorer_reward_model: give it exactly when"),
    ],
    ids=[
        "missing-column",
        "one-task",
        "unknown-task",
        "too-few-rows",
        "add-unknown",
        "families",
        "no-dataset",
        "no-reward-model",
    ],
)
def test_bad_tasks_dataset_fails_in_check_inputs(prefect_api, base, data_dir, bad, message):
    write_dataset(DATASET, string_task_rows())
    with pytest.raises(ValueError, match=message):
        kmeans_selector(params(base, **bad))
    run = sql("select run_id, status from runs").iloc[0]
    assert run["status"] == "failed"
    assert asyncio.run(task_runs(run["run_id"])) == [("check-inputs", "FAILED")]
    assert not (data_dir / "_models").exists() and list_datasets() == [DATASET]


def test_selector_method_does_not_import_the_world():
    import subprocess
    import sys

    code = (
        "import sys, flywheel.selectors, flywheel.selectors.evaluation, flywheel.llm.training; "
        "print(sorted(m for m in sys.modules if m.startswith('flywheel.world')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
