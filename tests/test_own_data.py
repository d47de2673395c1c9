"""Bring your own data and models: what a user has, built here with nothing downloaded.

English preference, seed, example and prompt data written as JSONL and brought in with
`flywheel import`; Llama, Qwen2 and GPT-2 models of a few hundred thousand parameters
sharing a BPE tokenizer trained on the spot, with a chat template and no pad token; then
the flows on them, against a real Prefect server. The models are untrained, so their
outputs are noise: the tests check the plumbing and the accounting, never quality.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.llm import BackendSpec, ManagedServer
from flywheel.store import read_dataset, read_model, sql, write_dataset
from tests.conftest import free_port
from tests.helpers.own_models import build_own_models, preference_rows

pytestmark = [pytest.mark.own_data, pytest.mark.usefixtures("prefect_api")]

TOPICS = ["the garden", "a bicycle", "the kitchen", "rainy weather", "a small library"]


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The user's models, data files imported into a data folder of this module's own."""
    root = tmp_path_factory.mktemp("own")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATA_DIR", str(root / "data"))
        models = {k: str(v) for k, v in build_own_models(root / "models").items()}
        files = _write_files(root / "files")
        runner = CliRunner()
        imported = {}
        for name, path in files.items():
            result = runner.invoke(app, ["import", str(path), "--name", name])
            assert result.exit_code == 0, result.output
            imported[name] = result.output
        yield {"models": models, "files": files, "imported": imported, "root": root}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_files(folder: Path) -> dict[str, Path]:
    text_pairs = preference_rows(24, seed=1)
    chat_pairs = preference_rows(24, seed=2, chat=True)
    # one long pair, past every max_length below: it must be counted, never silently lost
    long = dict(text_pairs[0], prompt="Tell me everything about trains. " * 40)
    prompts = [
        {"id": f"p{i}", "prompt": f"Write a short note about {t}.", "answer": f"A note on {t}."}
        for i, t in enumerate(TOPICS)
    ]
    chat_prompts = [
        {"id": f"c{i}", "prompt": [{"role": "user", "content": f"Describe {t}."}]}
        for i, t in enumerate(TOPICS)
    ]
    examples = [
        {"prompt": f"Write a short note about {t} ({i}).", "answer": f"A note on {t}."}
        for i, t in enumerate(TOPICS * 4)
    ]
    seeds = [
        {
            "instruction": [{"role": "user", "content": f"Write one sentence about {t}."}],
            "response": [{"role": "assistant", "content": f"{t.capitalize()} is calm today."}],
        }
        for t in TOPICS[:2]
    ]
    return {
        "own_text_prefs": _jsonl(folder / "text_prefs.jsonl", [*text_pairs, long]),
        "own_chat_prefs": _jsonl(folder / "chat_prefs.jsonl", chat_pairs),
        "own_prompts": _jsonl(folder / "prompts.jsonl", prompts),
        "own_chat_prompts": _jsonl(folder / "chat_prompts.jsonl", chat_prompts),
        "own_examples": _jsonl(folder / "examples.jsonl", examples),
        "own_seeds": _jsonl(folder / "seeds.jsonl", seeds),
    }


def _lineage_inputs(name: str) -> list[tuple[str, str]]:
    rows = sql(
        f"select input_kind, input_dataset from lineage where dataset = '{name}' "
        "order by input_kind, input_dataset"
    )
    return list(rows.itertuples(index=False, name=None))


def test_imports_land_with_lineage_to_their_files(own):
    for name, path in own["files"].items():
        ref = read_dataset(name)
        assert ref.meta["num_rows"] == sum(1 for _ in path.open())
        assert ("file", str(path.resolve())) in _lineage_inputs(name)
    chat = read_dataset("own_chat_prefs").to_arrow()
    assert str(chat.schema.field("prompt").type) == (  # as written (pyarrow's list naming)
        "list<item: struct<role: string, content: string>>"
    )


@pytest.fixture(scope="module")
def chat_server(own) -> Iterator[str]:
    """`transformers serve` on the user's Qwen2 chat model: the teacher and the judge."""
    pytest.importorskip("fastapi", reason="`transformers serve` needs the serve extra")
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    model = own["models"]["qwen2"]
    command = [exe, "serve", model, "--host", "127.0.0.1", "--port", port, "--device", "cpu"]
    base_url = f"http://127.0.0.1:{port}/v1"
    with ManagedServer(
        command,
        base_url,
        startup_timeout=120,
        env={"HF_HUB_OFFLINE": "1"},
        log_path=own["root"] / "serve.log",
    ):
        yield base_url


def _chat_teacher(own, url: str) -> BackendSpec:
    return BackendSpec(
        kind="openai", base_url=url, model=own["models"]["qwen2"], prompt_format="chat"
    )


def test_decode_hybrid_on_chat_prompts(own):
    from flywheel.flows.decode import HybridParams, hybrid_flow

    models = own["models"]
    out = hybrid_flow(
        HybridParams(
            prompts="own_chat_prompts",
            small_model=models["llama"],
            large_model=models["qwen2"],
            max_new_tokens=6,
            batch_size=4,
            output="own_hybrid",
        )
    )
    rows = read_dataset("own_hybrid").to_pandas()
    assert len(rows) == len(TOPICS)
    # rendered with the chat template, the assistant turn opened
    assert rows["prompt"].str.startswith("<|im_start|>user\nDescribe ").all()
    assert rows["prompt"].str.endswith("<|im_start|>assistant\n").all()
    assert out["figures"]["accuracy"] == "n/a (no answers)"

    # a prompt past GPT-2's 512 positions is refused by name before any decoding
    write_dataset("own_long_prompts", [{"id": "long", "prompt": "trains " * 600}])
    with pytest.raises(ValueError, match=r"prompt 'long' \(row 0\) is \d+ tokens; .*512 positions"):
        hybrid_flow(
            HybridParams(
                prompts="own_long_prompts",
                small_model=models["llama"],
                large_model=models["gpt2"],
                output="own_hybrid_long",
            )
        )


def _reward_params(**kw):
    from flywheel.flows.reward import RewardTrainParams

    defaults = dict(epochs=1, batch_size=8, max_length=64, eval_fraction=0.2)
    return RewardTrainParams(**{**defaults, **kw})


@pytest.mark.parametrize(
    ("dataset", "arch", "kind"),
    [
        ("own_text_prefs", "llama", "bradley-terry"),
        ("own_chat_prefs", "gpt2", "bradley-terry"),
        ("own_chat_prefs", "qwen2", "ensemble"),
    ],
)
def test_reward_train_on_own_pairs_and_models(own, dataset, arch, kind):
    from flywheel.flows.reward import train_flow

    name = f"own-{arch}-{kind}"
    out = train_flow(
        _reward_params(
            dataset=dataset, base_model=own["models"][arch], kind=kind, members=2, model_name=name
        )
    )
    figures = out["figures"]
    rows = read_dataset(dataset).meta["num_rows"]
    # every row is accounted for: trained, held out, or dropped with a reason
    assert figures["train pairs"] + figures["eval pairs"] == rows
    assert figures["train pairs trained"] == figures["train pairs"]
    assert figures["prompt format"] == "chat"  # the shared tokenizer has a chat template
    model = read_model(name)
    truncated = model.meta["metrics"]["length"]
    assert figures["train texts truncated to max_length 64"] == truncated["train"]["truncated"]
    if dataset == "own_text_prefs":  # its long pair is over 64 tokens, wherever it landed
        cut = truncated["train"]["truncated"] + truncated["eval"]["truncated"]
        assert cut >= 2  # chosen and rejected of the long pair
    inputs = _lineage_inputs(name)
    assert ("dataset", dataset) in inputs and ("model", arch) in inputs


def test_align_group_robust_on_own_pairs_with_length_counts(own):
    from flywheel.flows.align import GroupRobustParams, group_robust_flow

    out = group_robust_flow(
        GroupRobustParams(
            dataset="own_text_prefs",
            base_model=own["models"]["gpt2"],
            epochs=1,
            batch_size=8,
            max_length=48,
            eval_fraction=0.25,
            evaluation_dataset="own_align_eval",
            model_name="own-gpt2-gr-dpo",
        )
    )
    figures = out["figures"]
    metrics = read_model("own-gpt2-gr-dpo").meta["metrics"]
    length = metrics["length"]
    # the long pair is cut wherever it landed, and the per-group counts add up
    cut = length["train"]["all"]["truncated"] + length["eval"]["all"]["truncated"]
    assert cut >= 1
    for split in ("train", "eval"):
        by_group = length[split]["by_group"].values()
        assert sum(g["truncated"] for g in by_group) == length[split]["all"]["truncated"]
        assert (
            figures[f"{split} texts truncated to max_length 48"]
            == (length[split]["all"]["truncated"])
        )
    evaluation = read_dataset("own_align_eval").to_pandas()
    assert set(evaluation["group"]) == {"short", "long"}
    assert ("dataset", "own_text_prefs") in _lineage_inputs("own-gpt2-gr-dpo")


def test_decode_co_llm_trains_on_own_examples_and_sweeps_with_rouge(own):
    from flywheel.flows.decode import CoLLMParams, co_llm_flow

    models = own["models"]
    out = co_llm_flow(
        CoLLMParams(
            prompts="own_prompts",
            train_dataset="own_examples",
            validation_dataset="own_examples",
            base_model=models["llama"],
            assistant_model=models["qwen2"],
            model_name="own-co-llm",
            init_steps=2,
            steps=2,
            train_batch_size=4,
            max_length=24,
            etas=[0.0, 1.0],
            sweep_scorer="rouge_l",
            max_new_tokens=6,
            batch_size=4,
            baselines=False,
            output="own_co_llm",
        )
    )
    stats = read_model("own-co-llm").meta["metrics"]
    assert stats["prompt_format"] == "chat"
    assert stats["length"]["texts"] == read_dataset("own_examples").meta["num_rows"]
    sweep = sql("select * from co_llm_eta_sweep")
    assert sorted(sweep["eta"]) == [0.0, 1.0] and sweep["score"].notna().all()
    assert len(read_dataset("own_co_llm").to_pandas()) == len(TOPICS)
    assert out["figures"]["eta chosen by"] == "the validation sweep"
    assert out["figures"]["train texts truncated to max_length 24"] == stats["length"]["truncated"]


def test_decode_collab_with_the_users_reward_model(own):
    from flywheel.flows.decode import CollabParams, collab_flow

    models = own["models"]
    figures = collab_flow(
        CollabParams(
            prompts="own_chat_prompts",
            agents=[BackendSpec(model=models["llama"]), BackendSpec(model=models["qwen2"])],
            reward_model="own-llama-bradley-terry",
            k=2,
            rollout_len=2,
            max_new_tokens=3,
            batch_size=5,
            output="own_collab",
        )
    )["figures"]
    rows = read_dataset("own_collab").to_pandas()
    assert len(rows) == len(TOPICS) and rows["reward"].notna().all()
    assert ("model", "own-llama-bradley-terry") in _lineage_inputs("own_collab")
    # the reward model reads the prompts as given (chat) and cuts to its max_length, counted
    assert figures["reward model (scored in this run) texts truncated to max_length 64"] >= 0
    assert figures["reward model (scored in this run) longest text (tokens)"] > 0


def test_synth_reference_with_a_chat_teacher_behind_transformers_serve(own, chat_server):
    from flywheel.flows.synth import ReferenceSynthParams, reference

    out = reference(
        ReferenceSynthParams(
            seed_dataset="own_seeds",
            teacher="llm",
            teacher_backend=_chat_teacher(own, chat_server),
            teacher_max_new_tokens=24,
            responder=BackendSpec(model=own["models"]["llama"]),
            samples_per_feature=1,
            max_attempts=1,
            output="own_synth",
        )
    )
    # an untrained teacher answers noise: every unusable answer is a failure row with
    # its raw text, none is dropped or turned into an empty value
    failed = read_dataset("own_synth__failed").to_pandas()
    assert out["stats"]["failed"] == len(failed) > 0
    assert failed["raw"].notna().all()
    assert ("dataset", "own_seeds") in _lineage_inputs("own_synth__failed")


def test_relabel_with_an_llm_judge_and_with_the_human_queue(own, chat_server):
    from flywheel.flows.relabel import RelabelParams, relabel

    common = dict(
        ensemble="own-qwen2-ensemble",
        policy=BackendSpec(model=own["models"]["llama"]),
        prompts_dataset="own_prompts",
        validation_dataset="own_text_prefs",
        policy_max_new_tokens=8,
        budget=2,
        uncertain_fraction=1.0,
        projection_dim=64,
        refine_epochs=1,
    )
    judged = relabel(
        RelabelParams(
            **common,
            labeler="llm",
            judge=_chat_teacher(own, chat_server),
            candidates_dataset="own_judge_candidates",
            labeled_dataset="own_judge_labeled",
        )
    )
    figures = judged["figures"]
    # every policy pair left out before scoring is counted in the summary
    skipped = ("identical response pairs skipped", "pairs with an empty response skipped")
    assert all(isinstance(figures[k], int) for k in (*skipped, "repeated pairs skipped"))
    assert figures["labeled pairs"] + figures["labeler failures (ties, unparsed answers)"] == 2
    assert ("dataset", "own_prompts") in _lineage_inputs("own_judge_candidates")

    human = dict(common, labeler="human", queue="own_queue", labeled_dataset="own_human")
    queued = relabel(RelabelParams(**human, candidates_dataset="own_human_candidates"))
    assert queued["status"] == "queued"
    queue = read_dataset("own_queue").to_pandas()
    labels = own["root"] / "labels.csv"
    queue.assign(label="a")[["id", "label"]].to_csv(labels, index=False)
    refined = relabel(
        RelabelParams(**human, candidates_dataset="own_human_candidates", labels_file=str(labels))
    )
    assert refined["status"] == "refined"
    # what refinement cut for length is in the summary, as the ensemble reads (max_length 64)
    assert "train texts truncated to max_length 64" in refined["figures"]
    inputs = _lineage_inputs("own-qwen2-ensemble")
    assert ("dataset", "own_chat_prefs") in inputs  # the replayed pairs
