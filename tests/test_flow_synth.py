"""`synth/reference` under a real Prefect server: outputs, catalog, lineage, artifacts,
caching, bad input, and a run killed halfway that resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flywheel.flows.synth import ReferenceSynthParams, reference
from flywheel.llm import BackendSpec, ModelNotFound, make_backend
from flywheel.store import read_dataset, sql, write_dataset
from flywheel.synthesis.refed import RefedConfig, RefedRun, SeedDataError, references_from_rows
from tests.helpers.completions_server import CompletionsServer, completion
from tests.helpers.prefect_reads import read_artifact


def params(world_models: Path, **kw) -> ReferenceSynthParams:
    defaults = dict(
        responder=BackendSpec(model=str(world_models / "world-large")),
        n_references=8,
        samples_per_feature=4,
    )
    return ReferenceSynthParams(**{**defaults, **kw})


def test_flow_writes_datasets_catalog_lineage_and_artifact(
    prefect_api, world_models, data_dir
) -> None:
    out = reference(params(world_models))
    stats = out["stats"]
    assert stats["rows"] > 0 and stats["failed"] == 0
    samples = read_dataset("reference_synth")
    assert samples.num_rows == stats["rows"]
    assert f"reference_synth@{samples.version}" == out["datasets"]["samples"]
    by_family = sql("select family, count(*) n from reference_synth group by 1")
    assert by_family["n"].sum() == stats["rows"]
    assert read_dataset("reference_synth__failed").num_rows == 0
    # datasets load with HF datasets too
    assert len(samples.to_hf()) == stats["rows"]

    runs = sql("select * from runs")
    assert list(runs["flow"]) == ["synth/reference"] and list(runs["status"]) == ["completed"]
    run_id = runs["run_id"][0]
    calls = {c["model"]: c for c in json.loads(runs["model_calls"][0])}
    assert {c["backend"] for c in calls.values()} == {"transformers"}
    responder = calls[params(world_models).responder.model]
    assert responder["requests"] > 0 and responder["completion_tokens"] > 0
    assert json.loads(runs["parameters"][0])["n_references"] == 8
    lineage = sql("select input_dataset from lineage where dataset = 'reference_synth' order by 1")
    assert list(lineage["input_dataset"]) == ["reference_synth_feedback", "world_references"]
    assert set(
        sql("select produced_by from lineage where dataset like 'reference_synth%'")["produced_by"]
    ) == {run_id}

    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["synth-reference"]))
        )
    assert any("feedback requests per synthesized sample" in str(a.data) for a in arts)


def test_rerun_with_same_inputs_reuses_work_and_versions(prefect_api, world_models, data_dir):
    first = reference(params(world_models))
    second = reference(params(world_models))
    assert second["datasets"] == first["datasets"]
    assert second["stats"]["reused_earlier_output"]
    assert sql("select count(*) n from lineage where dataset = 'reference_synth'")["n"][0] == 2


def test_seed_dataset_with_missing_column_fails_before_work(
    prefect_api, world_models, data_dir
) -> None:
    write_dataset("my_seeds", [{"instruction": "copy abc", "answer": "abc"}])
    with pytest.raises(SeedDataError, match="column 'response' is missing"):
        reference(params(world_models, seed_dataset="my_seeds"))
    assert not (data_dir / "_work").exists()  # nothing expensive started
    assert list(sql("select status from runs")["status"]) == ["failed"]


def test_seed_dataset_with_empty_text_and_wrong_type(prefect_api, world_models, data_dir):
    write_dataset("empty_seeds", [{"instruction": "copy ab", "response": ""}])
    with pytest.raises(SeedDataError, match="row 0: 'response' is empty"):
        reference(params(world_models, seed_dataset="empty_seeds"))
    write_dataset("typed_seeds", [{"instruction": "copy ab", "response": 12}])
    with pytest.raises(SeedDataError, match="'response' must be text"):
        reference(params(world_models, seed_dataset="typed_seeds"))


def test_missing_model_path_fails_naming_the_path(prefect_api, data_dir) -> None:
    bad = ReferenceSynthParams(responder=BackendSpec(model=str(data_dir / "no-such-model")))
    with pytest.raises(ModelNotFound, match="no-such-model"):
        reference(bad)
    assert not (data_dir / "_work").exists()


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ValueError, match="output"):
        ReferenceSynthParams(responder=BackendSpec(model="x"), output="../etc")
    with pytest.raises(ValueError, match="n_references"):
        ReferenceSynthParams(responder=BackendSpec(model="x"), n_references=0)


def test_user_seed_dataset_is_synthesized_from(prefect_api, world_models, data_dir) -> None:
    rows = [{"instruction": f"copy {w}", "response": w} for w in ("abc", "xyzw", "hello")]
    seeds = write_dataset("my_seeds", rows)
    out = reference(params(world_models, seed_dataset="my_seeds", output="my_synth"))
    assert out["stats"]["references"] == 3
    lineage = sql("select input_dataset, input_version from lineage where dataset = 'my_synth'")
    assert ("my_seeds", seeds.version) in set(map(tuple, lineage.values.tolist()))


KILL_SCRIPT = """
import json, sys
from flywheel.flows.synth import ReferenceSynthParams, reference
reference(ReferenceSynthParams.model_validate(json.loads(sys.argv[1])))
"""


def test_run_killed_halfway_resumes_without_losing_or_duplicating_rows(
    prefect_api, world_models, data_dir, tmp_path
) -> None:
    p = params(world_models, n_references=40, samples_per_feature=8, chunk_size=4)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "FLYWHEEL_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, p.model_dump_json()],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    chunks: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        chunks = list((data_dir / "_work").glob("refed/*/responses/chunk-*.json"))
        if len(chunks) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workdir = chunks[0].parent.parent
    # killed in the middle of generation: some chunks written, the stage not finished
    assert not (workdir / "responses" / "_done.json").exists(), "run finished before the kill"
    assert 5 <= len(list((workdir / "responses").glob("chunk-*.json")))

    out = reference(p)  # same inputs: resumes from the checkpoint
    rows = read_dataset("reference_synth").to_pandas()
    assert len(rows) == out["stats"]["rows"] == rows["id"].nunique()

    # the same synthesis, never interrupted, in a separate folder
    refs_ref = read_dataset("world_references")
    refs = references_from_rows(refs_ref.to_pandas().to_dict("records"), "refs")
    config = RefedConfig.model_validate(p.model_dump(include=set(RefedConfig.model_fields)))
    from flywheel.world.teacher import WorldTeacher

    expected, _, _ = RefedRun(
        refs, config, tmp_path / "clean", WorldTeacher(), lambda: make_backend(config.responder)
    ).result()
    got = rows.set_index("id")[["instruction", "response", "initial_response"]]
    want = {r["id"]: (r["instruction"], r["response"], r["initial_response"]) for r in expected}
    assert set(got.index) == set(want)
    assert all(tuple(got.loc[i]) == want[i] for i in want)
    shutil.rmtree(workdir)


def test_nothing_synthesized_still_writes_failures(prefect_api, world_models, data_dir) -> None:
    """A real tiny model as LLM teacher cannot write JSON: every reference fails both
    feedbacks. The run completes, each failed request is kept with its raw text, the
    samples are empty."""
    teacher = BackendSpec(model=str(world_models / "world-small"))
    p = params(world_models, n_references=3, teacher="llm", teacher_backend=teacher, max_attempts=1)
    out = reference(p)
    assert out["stats"]["rows"] == 0 and out["stats"]["failed"] == 6
    assert read_dataset("reference_synth").num_rows == 0
    assert read_dataset("reference_synth_feedback").num_rows == 0
    failed = read_dataset("reference_synth__failed").to_pandas()
    # one row per failed request: instruction and response feedback, for each reference
    per_reference = failed.groupby("reference_id")["stage"].apply(sorted)
    assert len(per_reference) == 3
    assert all(s == ["instruction_feedback", "response_feedback"] for s in per_reference)
    # raw is whatever the model wrote (here often nothing), never replaced by a default
    assert failed["raw"].notna().all()
    assert failed["error"].str.contains("no JSON object").all()
    assert sql("select count(*) n from reference_synth__failed")["n"][0] == 6


def test_world_teacher_rejects_data_it_cannot_know(prefect_api, world_models, data_dir) -> None:
    write_dataset("prose", [{"instruction": "Write a haiku about rain", "response": "..."}])
    with pytest.raises(SeedDataError, match="teacher 'world' knows only world tasks"):
        reference(params(world_models, seed_dataset="prose"))


def test_new_model_weights_invalidate_the_cache(prefect_api, world_models, data_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world_models / "world-large", model)
    p = params(world_models, responder=BackendSpec(model=str(model)))
    first = reference(p)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new file: a retrained model
    second = reference(p)
    assert second["datasets"]["samples"] != first["datasets"]["samples"]
    assert len(list((data_dir / "_work" / "refed").iterdir())) == 2


def test_malformed_and_empty_responder_answers_land_in_the_failed_dataset(
    prefect_api, data_dir
) -> None:
    """An HTTP responder that answers `reverse` tasks with a malformed body and `copy`
    tasks with blanks: the run completes, each such item is one row of the failed dataset
    with its raw text, and the samples hold the other items only."""

    def answer(payload: dict) -> tuple[int, str]:
        instruction = payload["prompt"].rsplit("\n", 1)[-1].removesuffix("=")
        if instruction.startswith("reverse"):
            return 200, f"<html>busy: {instruction}</html>"
        if instruction.startswith("copy"):
            return 200, completion(" ")
        body = json.loads(completion("abc")) | {
            "usage": {"prompt_tokens": 5, "completion_tokens": 1}
        }
        return 200, json.dumps(body)

    with CompletionsServer(answer) as server:
        responder = BackendSpec(
            kind="openai", model="stand-in", base_url=server.base_url, max_retries=0
        )
        p = ReferenceSynthParams(responder=responder, n_references=6, samples_per_feature=3)
        out = reference(p)
        server_instructions = [r["prompt"].rsplit("\n", 1)[-1] for r in server.requests]
        instructions = set(server_instructions)
    failed = read_dataset("reference_synth__failed").to_pandas()
    samples = read_dataset("reference_synth").to_pandas()
    assert any(i.startswith("reverse") for i in instructions)
    assert any(i.startswith("copy") for i in instructions)
    assert set(failed["stage"]) == {"responses"} and failed["item_id"].is_unique
    malformed = failed[failed["raw"].str.startswith("<html>busy: reverse")]
    empty = failed[failed["error"] == "empty response"]
    assert len(malformed) + len(empty) == len(failed) == out["stats"]["failed"]
    assert malformed["error"].str.contains("malformed completions response").all()
    assert (empty["raw"] == " ").all()
    assert len(malformed) == sum(i.startswith("reverse") for i in instructions)
    assert len(empty) == sum(i.startswith("copy") for i in instructions)
    assert not set(samples["id"]) & set(failed["item_id"])
    assert (samples["initial_response"] == "abc").all() and len(samples) == out["stats"]["rows"]
    # what the backend sent is in the run's row and its summary
    (calls,) = json.loads(sql("select model_calls from runs")["model_calls"][0])
    answered = sum(not i.startswith(("reverse", "copy")) for i in server_instructions)
    assert (calls["backend"], calls["model"]) == ("openai", "stand-in")
    assert calls["requests"] == len(server.requests) and calls["failed"] == 0
    assert (calls["prompt_tokens"], calls["completion_tokens"]) == (5 * answered, answered)
    summary = read_artifact("synth-reference")
    assert "## Model calls" in summary
    assert f"| openai | stand-in | {len(server.requests)} |" in summary
