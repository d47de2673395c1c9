"""Pipeline overhead of `synth/reference`: the whole Prefect flow vs the backend alone.

The flow runs end to end in this process under Prefect's test harness (the
harness's server start-up is not timed; a tiny warm-up flow runs first),
`--flow-runs` times with new seeds so that nothing is cached. Then
the responder backend generates the very prompts REFED built (its one-shot
prompts, rebuilt from the run's checkpointed candidates) with the same
max_new_tokens, stop string and batch size, after a warm-up. The ratio
flow seconds / generation seconds is the price of everything around generation
(checks, feedback, instructions and the ROUGE-L filter, refinement, writes,
catalog, Prefect); the median over the runs is reported. Target: at most 1.10.

`--server-latency S` puts the responder behind the stand-in OpenAI-compatible server
of `http_backend.py` (answers after S seconds, so generation is not CPU-bound): the
flow's responder is then `kind='openai'` with `--in-flight` requests at once, and the
direct generation is `OpenAIBackend.generate` of the same prompts in one call.

    .venv/bin/python benchmarks/pipeline_overhead.py --quick --models data/_models
    .venv/bin/python benchmarks/pipeline_overhead.py --models data/_models --server-latency 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import bench_env, make_parser, model_info, table, world_models, write_results
from http_backend import stand_in_server

TARGET = 1.10


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


def time_direct(
    backend: Any, prompts: list[str], options: dict, repeats: int
) -> tuple[float, list[str]]:
    """Median seconds of `backend.generate(prompts)` over repeats, and its outputs."""
    backend.generate(prompts[:64], **options)  # warm-up
    times, outputs = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = backend.generate(prompts, **options)
        times.append(time.perf_counter() - started)
    return statistics.median(times), outputs


def main(args: argparse.Namespace) -> None:
    if args.references is None:
        args.references = 32 if args.quick else 240
    seeds = [args.seed + i for i in range(args.flow_runs)]
    with contextlib.ExitStack() as stack:
        data = stack.enter_context(bench_env(args))
        models = world_models(args, data)
        from prefect.testing.utilities import prefect_test_harness

        from flywheel.flows.synth import ReferenceSynthParams
        from flywheel.llm import BackendSpec, OpenAIBackend, TransformersBackend

        if args.server_latency is None:
            responder = BackendSpec(
                model=str(models["large"]), device=args.device, batch_size=args.batch_size
            )
        else:
            url = stack.enter_context(stand_in_server(args.server_latency))
            responder = BackendSpec(
                kind="openai", model="m", base_url=url, max_in_flight=args.in_flight
            )

        def params(output: str, n: int, per_feature: int, seed: int) -> ReferenceSynthParams:
            chunking = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
            return ReferenceSynthParams(
                output=output,
                n_references=n,
                samples_per_feature=per_feature,
                responder=responder,
                seed=seed,
                **chunking,
            )

        print("starting the Prefect test harness (not timed)...")
        flows = []
        with prefect_test_harness(server_startup_timeout=60):
            warm_s, _, _ = run_flow(params("bench_warmup", 2, 1, args.seed + 1000))
            print(f"warm-up flow: {warm_s:.1f}s")
            for seed in seeds:  # a new seed each time: new references, nothing cached
                flow_params = params(f"bench_synth_{seed}", args.references, args.per_feature, seed)
                flows.append(run_flow(flow_params))
                print(f"flow (seed {seed}): {flows[-1][0]:.1f}s")

        if args.server_latency is None:
            backend = TransformersBackend(
                models["large"], device=args.device, batch_size=args.batch_size
            )
        else:
            backend = OpenAIBackend(url, "m", max_in_flight=args.in_flight)
        options = dict(max_new_tokens=flow_params.max_new_tokens, stop=["\n"])
        runs = []
        for seed, (flow_s, result, tasks) in zip(seeds, flows, strict=True):
            stats = result["stats"]
            samples_version = result["datasets"]["samples"].split("@", 1)[1]
            prompts, flow_responses = refed_prompts(data, samples_version)
            direct_s, direct = time_direct(backend, prompts, options | {"seed": seed}, args.repeats)
            same = sum(a.strip() == b for a, b in zip(direct, flow_responses, strict=True))
            runs.append(
                {
                    "seed": seed,
                    "prompts_generated": len(prompts),
                    "rows_written": stats["rows"],
                    "failed_rows": stats["failed"],
                    "feedback_requests_per_sample": stats["feedback_requests_per_sample"],
                    "samples_per_reference": stats["samples_per_reference"],
                    "dropped_by_diversity": stats["dropped_by_diversity"],
                    "flow_seconds": flow_s,
                    "flow_task_seconds": tasks,
                    "flow_seconds_outside_tasks": flow_s - sum(tasks.values()),
                    "direct_generation_seconds": direct_s,
                    "direct_matches_flow_responses": same / len(prompts),
                    "ratio_flow_over_generation": flow_s / direct_s,
                }
            )
        backend.close()

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    ratio = median("ratio_flow_over_generation")
    task_names = list(runs[0]["flow_task_seconds"])
    figures = {
        "references": args.references,
        "samples_per_feature": args.per_feature,
        "batch_size": args.batch_size,
        "responder": responder.kind,
        "server_latency_s": args.server_latency,
        "in_flight": args.in_flight if args.server_latency is not None else None,
        "chunk_size": flow_params.chunk_size,
        "max_new_tokens": flow_params.max_new_tokens,
        "warmup_flow_seconds": warm_s,
        "runs": runs,
        "median_flow_seconds": median("flow_seconds"),
        "median_direct_generation_seconds": median("direct_generation_seconds"),
        "ratio_flow_over_generation": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "models": model_info(models),
    }

    def row(name: str, values: list[Any]) -> list[Any]:
        numbers = [v for v in values if isinstance(v, int | float)]
        return [name, *values, statistics.median(numbers) if numbers else ""]

    rows = [
        row("prompts generated", [r["prompts_generated"] for r in runs]),
        row("rows written", [r["rows_written"] for r in runs]),
        row("feedback requests per sample", [r["feedback_requests_per_sample"] for r in runs]),
        row("flow wall s", [r["flow_seconds"] for r in runs]),
        *[
            row(f"  task {name} s", [r["flow_task_seconds"].get(name, 0.0) for r in runs])
            for name in task_names
        ],
        row(
            "  outside tasks (Prefect, tracking) s", [r["flow_seconds_outside_tasks"] for r in runs]
        ),
        row("direct generation s", [r["direct_generation_seconds"] for r in runs]),
        row("direct == flow responses", [r["direct_matches_flow_responses"] for r in runs]),
        row("ratio flow / generation", [r["ratio_flow_over_generation"] for r in runs]),
    ]
    print(f"\n{args.references} references, samples_per_feature {args.per_feature}, ", end="")
    print(f"batch {args.batch_size}, chunk {flow_params.chunk_size}\n")
    print(table(["figure", *[f"seed {s}" for s in seeds], "median"], rows))
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"\nratio (median) {ratio:.3f}; target <= {TARGET}: {verdict}")
    name = "pipeline_overhead" if args.server_latency is None else "pipeline_overhead_server"
    write_results(name, args, seeds, json.loads(json.dumps(figures)), args.device)


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--references", type=int, help="default 240 (quick: 32)")
    parser.add_argument("--per-feature", type=int, default=8, help="samples_per_feature")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--chunk-size", type=int, help="REFED checkpoint chunk size (default: RefedConfig's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="direct generation repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=7, help="first flow run's seed")
    parser.add_argument("--flow-runs", type=int, default=3, help="measured flow runs (median)")
    parser.add_argument(
        "--server-latency", type=float, help="responder behind the stand-in server (seconds)"
    )
    parser.add_argument("--in-flight", type=int, default=256, help="with --server-latency")
    main(parser.parse_args())
