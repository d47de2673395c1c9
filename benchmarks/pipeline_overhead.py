"""Pipeline overhead of `synth/reference`: the whole Prefect flow vs the backend alone.

The flow runs end to end in this process under Prefect's test harness (the
harness's server start-up is not timed; a tiny warm-up flow runs first). Then
the responder backend generates the very prompts REFED built (its one-shot
prompts, rebuilt from the run's checkpointed candidates) with the same
max_new_tokens, stop string and batch size, after a warm-up. The ratio
flow seconds / generation seconds is the price of everything around generation
(checks, feedback, instructions and the ROUGE-L filter, refinement, writes,
catalog, Prefect). Target: at most 1.25.

    .venv/bin/python benchmarks/pipeline_overhead.py --quick --models data/_models
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import bench_env, make_parser, model_info, table, world_models, write_results

TARGET = 1.25


def task_seconds(flow_run_id: Any) -> dict[str, float]:
    """Seconds each task of a flow run took, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    seconds: dict[str, float] = {}
    for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
        name = run.name.rsplit("-", 1)[0]  # "collect-feedback-0" -> "collect-feedback"
        if run.start_time and run.end_time:
            seconds[name] = (run.end_time - run.start_time).total_seconds()
    return seconds


def refed_prompts(data: Path, samples_version: str) -> tuple[list[str], list[str]]:
    """The one-shot prompts REFED gave the responder, and the responses it got, read back
    from the checkpoint folder whose planned output versions include `samples_version`."""
    from flywheel.store import Checkpoint, list_versions, read_dataset
    from flywheel.world.tasks import one_shot_prompt

    for folder in (data / "_work" / "refed").iterdir():
        ckpt = Checkpoint(folder)
        if (ckpt.get("versions") or {}).get("samples") == samples_version:
            break
    else:
        raise RuntimeError(f"no REFED checkpoint wrote samples version {samples_version}")
    references = {}  # every version of the world's references (warm-up and measured run)
    for version in list_versions("world_references"):
        for row in read_dataset("world_references", version).to_pandas().to_dict("records"):
            references[row["id"]] = row
    kept = [c for c in ckpt.get("candidates") if c["kept"]]
    prompts = []
    for c in kept:
        ref = references[c["reference_id"]]
        prompts.append(one_shot_prompt(ref["instruction"], ref["response"], c["instruction"]))
    responses = {r["id"]: r.get("response") for r in ckpt.load("responses")}
    return prompts, [responses[c["id"]] for c in kept]


def run_flow(params: Any) -> tuple[float, dict, dict[str, float]]:
    """Run `synth/reference`; return (wall seconds, its result, seconds per task)."""
    from flywheel.flows.synth import reference

    started = time.perf_counter()
    state = reference(params, return_state=True)
    seconds = time.perf_counter() - started
    result = state.result()
    return seconds, result, task_seconds(state.state_details.flow_run_id)


def main(args: argparse.Namespace) -> None:
    if args.references is None:
        args.references = 32 if args.quick else 120
    with bench_env(args) as data:
        models = world_models(args, data)
        from prefect.testing.utilities import prefect_test_harness

        from flywheel.flows.synth import ReferenceSynthParams
        from flywheel.llm import BackendSpec, TransformersBackend

        responder = BackendSpec(
            model=str(models["large"]), device=args.device, batch_size=args.batch_size
        )

        def params(output: str, n: int, per_feature: int, seed: int) -> ReferenceSynthParams:
            return ReferenceSynthParams(
                output=output,
                n_references=n,
                samples_per_feature=per_feature,
                responder=responder,
                seed=seed,
            )

        print("starting the Prefect test harness (not timed)...")
        with prefect_test_harness(server_startup_timeout=60):
            warm_s, _, _ = run_flow(params("bench_warmup", 2, 1, args.seed + 1000))
            print(f"warm-up flow: {warm_s:.1f}s")
            flow_params = params("bench_synth", args.references, args.per_feature, args.seed)
            flow_s, result, tasks = run_flow(flow_params)
        stats = result["stats"]
        samples_version = result["datasets"]["samples"].split("@", 1)[1]
        prompts, flow_responses = refed_prompts(data, samples_version)
        print(f"flow: {flow_s:.1f}s for {len(prompts)} prompts, {stats['rows']} rows")

        backend = TransformersBackend(
            models["large"], device=args.device, batch_size=args.batch_size
        )
        options = dict(max_new_tokens=flow_params.max_new_tokens, stop=["\n"], seed=args.seed)
        backend.generate(prompts[: 2 * args.batch_size], **options)  # warm-up
        times, direct = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            direct = backend.generate(prompts, **options)
            times.append(time.perf_counter() - started)
        backend.close()
        direct_s = statistics.median(times)

    same = sum(a.strip() == b for a, b in zip(direct, flow_responses, strict=True))
    ratio = flow_s / direct_s
    figures = {
        "references": args.references,
        "samples_per_feature": args.per_feature,
        "batch_size": args.batch_size,
        "max_new_tokens": flow_params.max_new_tokens,
        "prompts_generated": len(prompts),
        "rows_written": stats["rows"],
        "failed_rows": stats["failed"],
        "feedback_requests_per_sample": stats["feedback_requests_per_sample"],
        "samples_per_reference": stats["samples_per_reference"],
        "dropped_by_diversity": stats["dropped_by_diversity"],
        "warmup_flow_seconds": warm_s,
        "flow_seconds": flow_s,
        "flow_task_seconds": tasks,
        "direct_generation_seconds": direct_s,
        "direct_generation_repeats": times,
        "direct_matches_flow_responses": same / len(prompts),
        "ratio_flow_over_generation": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "models": model_info(models),
    }
    rows = [
        ["references", args.references],
        ["samples per feature", args.per_feature],
        ["prompts generated", len(prompts)],
        ["rows written", stats["rows"]],
        ["feedback requests per sample", stats["feedback_requests_per_sample"]],
        ["flow wall s (warm)", flow_s],
        *[[f"  task {name} s", s] for name, s in tasks.items()],
        ["direct generation s (median)", direct_s],
        ["direct == flow responses", f"{same}/{len(prompts)}"],
        ["ratio flow / generation", ratio],
        ["target", f"<= {TARGET} ({'met' if ratio <= TARGET else 'NOT met'})"],
    ]
    print()
    print(table(["figure", "value"], rows))
    seeds = [args.seed]
    write_results("pipeline_overhead", args, seeds, json.loads(json.dumps(figures)), args.device)


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--references", type=int, help="default 120 (quick: 32)")
    parser.add_argument("--per-feature", type=int, default=8, help="samples_per_feature")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="direct generation repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=7)
    main(parser.parse_args())
