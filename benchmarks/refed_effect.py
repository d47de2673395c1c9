"""REFED's effect on the world: fine-tune the small model on the seed references alone
vs on the REFED-synthesized set built from the same references.

Per seed: sample N seed references from the world; run REFED on them (world
teacher, world-large as responder); then fine-tune the SAME starting model for
the SAME steps and batch size: by default the bootstrapped world-small (as the
paper fine-tunes a pretrained model), or with `--init scratch` a fresh random
init; on

  (a) the seed references alone,
  (b) REFED: the seed references plus the synthesized samples (refined responses),
  (c) ablation: the same set with the responder's unrefined `initial_response`,

and measure exact-match accuracy per family on held-out world tasks (none of
which appears in any training set). Also REFED's cost figures: samples per
reference, and feedback requests per synthesized sample against 2.0 for
sample-level feedback (one instruction and one response feedback per sample).

    .venv/bin/python benchmarks/refed_effect.py --quick --models data/_models
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from common import (
    bench_env,
    make_parser,
    mean_std,
    model_info,
    table,
    world_models,
    write_results,
)

ARMS = {
    "base": "bootstrapped world-small, not fine-tuned",
    "seeds": "(a) seed references only",
    "refed": "(b) REFED (seeds + synthesized)",
    "refed_unrefined": "(c) REFED, unrefined responses",
}
SAMPLE_LEVEL_FEEDBACK_PER_SAMPLE = 2.0  # one instruction + one response feedback per sample


def run_refed(
    references: list, large: Path, seed: int, workdir: Path, per_feature: int
) -> tuple[list[dict], dict]:
    """REFED over the references with the world teacher; (synthesized rows, stats)."""
    from flywheel.flows.synth import WorldRefedConfig
    from flywheel.llm import BackendSpec, make_backend
    from flywheel.synthesis.refed import RefedRun
    from flywheel.world.teacher import WorldTeacher

    config = WorldRefedConfig(
        samples_per_feature=per_feature, responder=BackendSpec(model=str(large)), seed=seed
    )
    run = RefedRun(
        references, config, workdir, WorldTeacher(seed=seed), lambda: make_backend(config.responder)
    )
    started = time.perf_counter()
    rows, failed, stats = run.result()
    stats["seconds"] = time.perf_counter() - started
    if failed:
        print(f"  REFED: {len(failed)} failed rows, e.g. {failed[0]}")
    return rows, stats


def train_and_evaluate(
    examples: list[tuple[str, str]],
    tasks: list,
    seed: int,
    folder: Path,
    args: argparse.Namespace,
    init: Path | None,
) -> dict:
    """Fine-tune world-small (the bootstrapped one at `init`, or a fresh random init from
    `seed` when init is None) and evaluate it on `tasks`."""
    from transformers import AutoModelForCausalLM

    from flywheel.llm.training import train_causal_lm
    from flywheel.world.bootstrap import evaluate_model
    from flywheel.world.models import char_tokenizer, new_tiny_model, save_tiny

    model = (
        AutoModelForCausalLM.from_pretrained(init) if init else new_tiny_model("small", seed=seed)
    )
    train = train_causal_lm(
        model,
        char_tokenizer(),
        examples,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
    )
    save_tiny(model, folder)
    return {"train_examples": len(examples), "train": train, **evaluate_model(folder, tasks)}


def evaluate_model_at(folder: Path, tasks: list) -> dict:
    from flywheel.world.bootstrap import evaluate_model

    return {"train": {"steps": 0, "seconds": 0.0}, **evaluate_model(folder, tasks)}


def one_seed(seed: int, models: dict, work: Path, args: argparse.Namespace) -> dict:
    from flywheel.synthesis.refed import references_from_rows
    from flywheel.world.bootstrap import held_out_tasks
    from flywheel.world.tasks import SEP, sample_tasks

    seed_tasks = sample_tasks(args.references, random.Random(seed))
    references = references_from_rows([t.as_row() for t in seed_tasks], f"world seed {seed}")
    rows, stats = run_refed(
        references, models["large"], seed, work / f"refed-{seed}", args.per_feature
    )
    init = models["small"] if args.init == "world-small" else None
    seeds_only = [(r.instruction + SEP, r.response) for r in references]
    sets = {
        "seeds": seeds_only,
        "refed": seeds_only + [(r["instruction"] + SEP, r["response"]) for r in rows],
        "refed_unrefined": seeds_only
        + [(r["instruction"] + SEP, r["initial_response"]) for r in rows],
    }
    trained_on = {r.instruction for r in references} | {r["instruction"] for r in rows}
    tasks = [t for t in held_out_tasks(args.eval_tasks) if t.instruction not in trained_on]
    arms = {}
    if init is not None:  # the starting point itself, for reference
        arms["base"] = {"train_examples": 0, **evaluate_model_at(init, tasks)}
    for arm, examples in sets.items():
        arms[arm] = train_and_evaluate(examples, tasks, seed, work / f"{arm}-{seed}", args, init)
        print(
            f"  seed {seed} {arm}: {len(examples)} examples, "
            f"{arms[arm]['train']['seconds']:.0f}s, accuracy {arms[arm]['accuracy']['all']:.3f}"
        )
    refed_stats = {
        "samples_per_reference": stats["samples_per_reference"],
        "synthesized_samples": stats["rows"],
        "feedback_requests": stats["feedback_requests"],
        "feedback_requests_per_sample": stats["feedback_requests_per_sample"],
        "sample_level_feedback_requests_per_sample": SAMPLE_LEVEL_FEEDBACK_PER_SAMPLE,
        "refined_changed_share": stats["refined_changed"] / stats["rows"],
        "dropped_by_diversity": stats["dropped_by_diversity"],
        "failed": stats["failed"],
        "seconds": stats["seconds"],
    }
    return {"eval_tasks": len(tasks), "refed": refed_stats, "arms": arms}


def main(args: argparse.Namespace) -> None:
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    if args.steps is None:
        args.steps = (300 if args.quick else 600) if args.init == "world-small" else 2000
    if args.lr is None:
        args.lr = 1e-3 if args.init == "world-small" else 5e-3
    per_seed: dict[int, dict] = {}
    with bench_env(args) as data:
        models = world_models(args, data)
        for seed in seeds:
            print(f"seed {seed}: REFED on {args.references} references, then 3 fine-tunes")
            per_seed[seed] = one_seed(seed, models, data / "_bench", args)
        info = model_info(models)

    arms_run = [a for a in ARMS if a in per_seed[seeds[0]]["arms"]]
    families = list(per_seed[seeds[0]]["arms"]["seeds"]["accuracy"])  # sorted, with "all"
    families = [f for f in families if f != "all"] + ["all"]
    summary: dict[str, dict[str, list[float]]] = {}
    rows = []
    for family in [*families, "hard"]:
        row: list = [family if family != "hard" else "all, len>=6"]
        for arm in arms_run:
            if family == "hard":
                values = [per_seed[s]["arms"][arm]["accuracy_hard"]["all"] for s in seeds]
            else:
                values = [per_seed[s]["arms"][arm]["accuracy"].get(family, 0.0) for s in seeds]
            mean, std = mean_std(values)
            summary.setdefault(arm, {})[family] = [mean, std]
            row.append(f"{mean:.3f} ± {std:.3f}")
        rows.append(row)
    print(f"\nheld-out accuracy of world-small, mean ± std over seeds {seeds}")
    print(
        f"(from {args.init}: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, "
        f"{args.references} seed references)\n"
    )
    print(table(["family", *(ARMS[a] for a in arms_run)], rows))

    stat_names = [
        "synthesized_samples",
        "samples_per_reference",
        "feedback_requests_per_sample",
        "sample_level_feedback_requests_per_sample",
        "refined_changed_share",
        "seconds",
    ]
    refed_mean = {k: mean_std([per_seed[s]["refed"][k] for s in seeds])[0] for k in stat_names}
    refed_mean["feedback_saving_factor"] = (
        SAMPLE_LEVEL_FEEDBACK_PER_SAMPLE / refed_mean["feedback_requests_per_sample"]
    )
    print("\nREFED synthesis, mean over seeds\n")
    print(table(["figure", "value"], [[k.replace("_", " "), v] for k, v in refed_mean.items()]))

    figures = {
        "references": args.references,
        "samples_per_feature": args.per_feature,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "init": args.init,
        "eval_tasks_requested": args.eval_tasks,
        "accuracy_mean_std": summary,
        "refed_mean": refed_mean,
        "per_seed": per_seed,
        "models": info,
    }
    write_results("refed_effect", args, seeds, figures, "cpu")


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--references", type=int, default=24, help="seed references per seed")
    parser.add_argument("--per-feature", type=int, default=8, help="REFED samples_per_feature")
    parser.add_argument(
        "--steps", type=int, help="fine-tuning steps (world-small: 600, quick 300; scratch: 2000)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, help="default 1e-3 from world-small, 5e-3 scratch")
    parser.add_argument(
        "--init",
        choices=["world-small", "scratch"],
        default="world-small",
        help="fine-tune the bootstrapped world-small (as the paper fine-tunes a pretrained "
        "model) or a fresh random init",
    )
    parser.add_argument("--eval-tasks", type=int, default=600, help="held-out world tasks")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0 1)")
    main(parser.parse_args())
