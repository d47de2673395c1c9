"""The k-means LoRA adapter selector ("Adapters Selector") on the world: routing accuracy of
selectors trained on k-means vs random samples (equal samples per task, both selector
kinds), task accuracy of routed adapters vs the base model, one multi-task adapter and
oracle routing, then a sixth task's adapter added by updating the selector only.

    .venv/bin/python benchmarks/kmeans_selector.py --quick --models data/_models
    .venv/bin/python benchmarks/kmeans_selector.py --models data/_models
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from common import bench_env, make_parser, mean_std, model_info, table, world_models, write_results

KINDS = ("lora", "head")
# the baselines' folder and peft adapter names
MULTITASK = {"multi-task adapter": "multitask", "multi-task adapter, equal params": "wide"}
FAMILY_COLUMNS = ("base", "own adapter", *MULTITASK)


def task_data(family: str, n: int, seed: int) -> list:
    from flywheel.world.tasks import sample_tasks

    return sample_tasks(n, random.Random(f"{seed}-{family}"), [family])


def accuracy(tasks: list, outputs: list[str]) -> float:
    from flywheel.world.tasks import check

    return sum(check(t, o) for t, o in zip(tasks, outputs, strict=True)) / len(tasks)


def world_scorer(tasks: list):
    """The world's checker as a selector-evaluation scorer (prompts name their task)."""
    from flywheel.world.tasks import check

    by_prompt = {t.prompt: t for t in tasks}

    def score(prompts, outputs, answers) -> list[float]:
        return [check(by_prompt[p], o) for p, o in zip(prompts, outputs, strict=True)]

    return score


def one_seed(seed: int, base: Path, work: Path, args: argparse.Namespace) -> dict:
    from peft import PeftModel

    from flywheel.selectors import (
        AdapterLibrary,
        AdaptersSelector,
        EvalSet,
        LoraTraining,
        PromptEmbedder,
        SelectorConfig,
        evaluate_selectors,
        generate_greedy,
        load_base,
        routing_accuracy,
        select_samples,
        train_lora,
    )
    from flywheel.world.bootstrap import HELD_OUT_TASK_SEED, held_out_tasks
    from flywheel.world.tasks import MAX_LEN

    families, added = args.families, args.add
    data = {f: task_data(f, args.samples_per_task, seed) for f in [*families, added]}
    training = LoraTraining(rank=args.rank, steps=args.adapter_steps, lr=args.adapter_lr, seed=seed)
    out: dict = {"adapter_seconds": {}}
    library = AdapterLibrary.create(work / f"library-{seed}", base)
    for family in families:
        started = time.perf_counter()
        library.train(family, [(t.prompt, t.answer) for t in data[family]], training)
        out["adapter_seconds"][family] = time.perf_counter() - started
    # the sixth adapter is trained on its own, outside the library, then added by path
    new_adapter = work / f"{added}-{seed}"
    train_lora(base, [(t.prompt, t.answer) for t in data[added]], new_adapter, training)
    # one adapter on every task's data for the same total steps: at the same rank, and at
    # the rank that gives it as many parameters as all the task adapters together
    every = [(t.prompt, t.answer) for f in families for t in data[f]]
    out["multitask_seconds"] = {}
    for name, slug in MULTITASK.items():
        rank = args.rank * (len(families) if slug == "wide" else 1)
        steps = args.adapter_steps * len(families)
        multi = training.model_copy(update={"steps": steps, "rank": rank})
        started = time.perf_counter()
        train_lora(base, every, work / f"{slug}-{seed}", multi)
        out["multitask_seconds"][name] = time.perf_counter() - started

    held = held_out_tasks(args.eval_tasks, seed=HELD_OUT_TASK_SEED + seed)
    old = [t for t in held if t.family in families]
    new = [t for t in held if t.family == added]
    prompts = {f: [t.prompt for t in data[f]] for f in [*families, added]}
    old_prompts, old_truth = [t.prompt for t in old], [t.family for t in old]
    max_new = MAX_LEN + 2
    embedder = PromptEmbedder(base)

    # routing accuracy, k-means vs random at the same samples per task
    out["routing"] = {}
    systems: dict = {}
    for k, per_centre in args.budgets:
        for selection in ("kmeans", "random"):
            samples = select_samples(
                {f: prompts[f] for f in families},
                embedder,
                k=k,
                per_centre=per_centre,
                distance=args.distance,
                selection=selection,
                seed=seed,
            )
            for kind in KINDS:
                config = SelectorConfig(
                    kind=kind,
                    selection=selection,
                    k=k,
                    per_centre=per_centre,
                    distance=args.distance,
                    rank=args.selector_rank,
                    steps=args.selector_steps,
                    old_share=args.old_share,
                    seed=seed,
                )
                started = time.perf_counter()
                system = AdaptersSelector.from_samples(library, samples, config, embedder)
                seconds = time.perf_counter() - started
                routes = system.route(old_prompts)
                key = f"{kind}/{selection}/{k}x{per_centre}"
                out["routing"][key] = {
                    **routing_accuracy(routes, old_truth),
                    "train_seconds": seconds,
                }
                if (k, per_centre) == tuple(args.main_budget):
                    systems[(kind, selection)] = system

    # task accuracy: routed adapters vs base, multi-task adapter and oracle routing
    model, tok = load_base(base)
    multitask = None
    for slug in MULTITASK.values():
        path = str(work / f"{slug}-{seed}")
        if multitask is None:
            multitask = PeftModel.from_pretrained(model, path, adapter_name=slug)
        else:
            multitask.load_adapter(path, adapter_name=slug)
    assert multitask is not None
    multitask.eval()

    def baseline(slug: str):
        def generate(prompts: list[str]) -> list[str]:
            multitask.set_adapter(slug)
            return generate_greedy(multitask, tok, prompts, max_new)

        return generate

    result = evaluate_selectors(
        {f"{kind}/{selection}": system for (kind, selection), system in systems.items()},
        EvalSet(old_prompts, old_truth, [t.answer for t in old]),
        world_scorer(old),
        max_new_tokens=max_new,
        baselines={name: baseline(slug) for name, slug in MULTITASK.items()},
    )
    by_family = result["task_accuracy_by_task"]
    out["task_accuracy"] = result["task_accuracy"]
    out["per_family"] = {
        family: {
            "base": by_family["base model"][family],
            "own adapter": by_family["oracle routing"][family],
            **{name: by_family[name][family] for name in MULTITASK},
        }
        for family in families
    }

    # add the sixth adapter by updating the selector only
    all_tasks = old + new
    all_prompts, all_truth = [t.prompt for t in all_tasks], [t.family for t in all_tasks]
    out["add"] = {}
    for kind in KINDS:
        system = systems[(kind, "kmeans")]
        before_routes = system.route(old_prompts)
        before = accuracy(
            old,
            system.generator().generate(old_prompts, max_new_tokens=max_new, routes=before_routes),
        )
        digests = {f: library.digest(f) for f in families}
        started = time.perf_counter()
        system.add_adapter(added, new_adapter, prompts[added])
        seconds = time.perf_counter() - started
        assert {f: library.digest(f) for f in families} == digests  # old adapters untouched
        gen = system.generator()
        routes = system.route(all_prompts)
        outputs = gen.generate(all_prompts, max_new_tokens=max_new, routes=routes)
        n_old = len(old)
        entry = {
            "update_seconds": seconds,
            "old tasks routed accuracy before": before,
            "old tasks routed accuracy after": accuracy(old, outputs[:n_old]),
            "old tasks routing accuracy before": routing_accuracy(before_routes, old_truth)["all"],
            "old tasks routing accuracy after": routing_accuracy(routes[:n_old], old_truth)["all"],
            "new task routing accuracy": routing_accuracy(routes[n_old:], all_truth[n_old:])["all"],
            "new task routed accuracy": accuracy(new, outputs[n_old:]),
            "new task base accuracy": accuracy(
                new, gen.generate_base([t.prompt for t in new], max_new_tokens=max_new)
            ),
            "all tasks routed accuracy": accuracy(all_tasks, outputs),
            "all tasks oracle accuracy": accuracy(
                all_tasks, gen.generate(all_prompts, max_new_tokens=max_new, routes=all_truth)
            ),
        }
        # reference: a selector of this kind trained from scratch on all six tasks' samples
        scratch = AdaptersSelector.train(
            library, {f: prompts[f] for f in [*families, added]}, system.config, embedder
        )
        entry["all tasks routing accuracy, retrained from scratch"] = routing_accuracy(
            scratch.route(all_prompts), all_truth
        )["all"]
        entry["all tasks routing accuracy, updated"] = routing_accuracy(routes, all_truth)["all"]
        out["add"][kind] = entry
    return out


def main(args: argparse.Namespace) -> None:
    seeds = args.seeds or [0, 1, 2]
    per_seed = {}
    started = time.perf_counter()
    with bench_env(args) as data:
        models = world_models(args, data)
        for seed in seeds:
            t0 = time.perf_counter()
            per_seed[seed] = one_seed(seed, models["small"], data / "_bench", args)
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s")
        info = model_info({"small": models["small"]})

    def ms(get) -> str:
        mean, std = mean_std([get(per_seed[s]) for s in seeds])
        return f"{mean:.3f} ± {std:.3f}"

    routing_rows = []
    for k, per_centre in args.budgets:
        for kind in KINDS:
            key = f"{kind}/{{}}/{k}x{per_centre}"
            routing_rows.append(
                [
                    kind,
                    f"{k * per_centre} (k={k} x {per_centre})",
                    ms(lambda r, key=key: r["routing"][key.format("kmeans")]["all"]),
                    ms(lambda r, key=key: r["routing"][key.format("random")]["all"]),
                    ms(
                        lambda r, key=key: (
                            r["routing"][key.format("kmeans")]["all"]
                            - r["routing"][key.format("random")]["all"]
                        )
                    ),
                ]
            )
    print(f"\nrouting accuracy on held-out tasks of {len(args.families)} families\n")
    routing_table = table(
        ["selector", "samples per task", "k-means", "random", "k-means - random (paired)"],
        routing_rows,
    )
    print(routing_table)

    systems = list(per_seed[seeds[0]]["task_accuracy"])
    task_rows = [[name, ms(lambda r, name=name: r["task_accuracy"][name])] for name in systems]
    k, per_centre = args.main_budget
    print(f"\ntask accuracy (exact match), selectors on {k * per_centre} samples per task\n")
    task_table = table(["system", "accuracy"], task_rows)
    print(task_table)
    family_rows = [
        [f] + [ms(lambda r, f=f, c=c: r["per_family"][f][c]) for c in FAMILY_COLUMNS]
        for f in args.families
    ]
    family_table = table(["family", *FAMILY_COLUMNS], family_rows)
    print("\n" + family_table)

    add_keys = list(per_seed[seeds[0]]["add"]["lora"])
    add_rows = [
        [key] + [ms(lambda r, k=k, key=key: r["add"][k][key]) for k in KINDS] for key in add_keys
    ]
    print(f"\nadding {args.add!r} by updating the selector only (old_share {args.old_share})\n")
    add_table = table(["figure", "lora selector", "head selector"], add_rows)
    print(add_table)
    figures = {
        "families": args.families,
        "added": args.add,
        "samples_per_task": args.samples_per_task,
        "budgets": args.budgets,
        "main_budget": args.main_budget,
        "distance": args.distance,
        "adapter": {"rank": args.rank, "steps": args.adapter_steps, "lr": args.adapter_lr},
        "selector": {"rank": args.selector_rank, "steps": args.selector_steps},
        "old_share": args.old_share,
        "eval_tasks": args.eval_tasks,
        "routing_table": routing_table,
        "task_table": task_table,
        "family_table": family_table,
        "add_table": add_table,
        "per_seed": per_seed,
        "models": info,
        "seconds": time.perf_counter() - started,
    }
    write_results("kmeans_selector", args, seeds, figures, "cpu")


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    parser.add_argument(
        "--families", nargs="+", default=["copy", "reverse", "sort", "count", "shift"]
    )
    parser.add_argument("--add", default="dedup", help="the family added afterwards")
    parser.add_argument("--samples-per-task", type=int, default=1000)
    parser.add_argument("--adapter-steps", type=int, default=300)
    parser.add_argument("--adapter-lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the task adapters")
    parser.add_argument("--selector-rank", type=int, default=4)
    parser.add_argument("--selector-steps", type=int, default=150)
    parser.add_argument("--distance", choices=["euclidean", "cosine"], default="euclidean")
    parser.add_argument("--old-share", type=float, default=0.3)
    parser.add_argument("--eval-tasks", type=int, default=600)
    args = parser.parse_args()
    args.budgets = [(1, 1), (2, 1), (4, 1), (4, 2), (8, 2)]
    args.main_budget = (4, 2)
    if args.quick:
        args.seeds = args.seeds or [0]
        args.samples_per_task = min(args.samples_per_task, 500)
        args.adapter_steps = min(args.adapter_steps, 150)
        args.budgets = [(1, 1), (4, 2)]
    main(args)
