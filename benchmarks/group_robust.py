"""Group robust preference optimisation on the world's disagreeing, imbalanced groups.

Pairs: `world.tasks.group_preference_pairs`: the same answer in two styles, "plain"
(80% of pairs) prefers `abc`, "spaced" (20%) prefers `a b c`; the prompt names the
group. Policy and reference: world-small. In one run, per seed: TRL's DPO and IPO
(the paper's baselines), GR-DPO and GR-IPO, and GR-DPO with eta_q = 0 (uniform group
weights: what group-balancing alone does, without the min-max weights). Held-out
preference accuracy per group, worst group and mean over pairs.

Speed: GR-DPO vs TRL's DPOTrainer on the same data and model, steps/s, runs
interleaved so both see the same machine load.

    .venv/bin/python benchmarks/group_robust.py --models data/_models
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

from common import bench_env, make_parser, mean_std, model_info, table, world_models, write_results

ARMS = {  # arm -> (method, extra config)
    "DPO (TRL)": ("dpo", {}),
    "IPO (TRL)": ("ipo", {}),
    "GR-DPO": ("gr-dpo", {}),
    "GR-IPO": ("gr-ipo", {}),
    "GR-DPO, eta_q=0": ("gr-dpo", {"eta_q": 0.0}),
}


def run_arm(method: str, extra: dict, train, evaluation, base: Path, args, seed: int) -> dict:
    from flywheel.alignment.group_robust import GroupRobustConfig, train_group_robust

    config = GroupRobustConfig(
        method=method,
        base_model=str(base),
        learning_rate=args.lr,
        epochs=args.epochs,
        seed=seed,
        **extra,
    )
    with tempfile.TemporaryDirectory() as out:
        return train_group_robust(train, evaluation, config, out)


def speed(base: Path, args) -> dict:
    """Steps/s of GR-DPO and TRL's DPO, alternating, `args.speed_repeats` times each."""
    from flywheel.world.tasks import group_preference_pairs

    train = group_preference_pairs(args.speed_pairs, random.Random(0))
    evaluation = group_preference_pairs(50, random.Random(1))
    rates: dict[str, list[float]] = {"dpo": [], "gr-dpo": []}
    for repeat in range(args.speed_repeats):
        for method in ("dpo", "gr-dpo") if repeat % 2 == 0 else ("gr-dpo", "dpo"):
            report = run_arm(method, {}, train, evaluation, base, args, 0)
            rates[method].append(report["steps_per_second"])
            print(f"  speed {method}: {report['steps']} steps, {report['steps_per_second']:.2f}/s")
    ratios = [g / d for g, d in zip(rates["gr-dpo"], rates["dpo"], strict=True)]
    return {
        "steps_per_second": rates,
        "ratio_gr_dpo_over_dpo": ratios,
        "median_ratio": statistics.median(ratios),
    }


def main(args: argparse.Namespace) -> None:
    from flywheel.world.tasks import group_preference_pairs

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    with bench_env(args) as data:
        base = world_models(args, data)["small"]
        per_seed: dict[int, dict] = {}
        for seed in seeds:
            train = group_preference_pairs(args.pairs, random.Random(seed))
            evaluation = group_preference_pairs(args.eval_pairs, random.Random(10_000 + seed))
            per_seed[seed] = {}
            for arm, (method, extra) in ARMS.items():
                report = run_arm(method, extra, train, evaluation, base, args, seed)
                report.pop("history")
                per_seed[seed][arm] = report
                held = report["held_out"]
                print(
                    f"seed {seed} {arm}: worst group {held['worst_group']} "
                    f"{held['worst_group_accuracy']:.3f}, accuracy {held['accuracy']:.3f}, "
                    f"weights {report['final_group_weights']}"
                )
        rows, summary = [], {}
        groups = sorted(per_seed[seeds[0]]["GR-DPO"]["held_out"]["groups"])
        for arm in ARMS:

            def figure(get, arm=arm):
                return mean_std([get(per_seed[s][arm]["held_out"]) for s in seeds])

            worst = figure(lambda h: h["worst_group_accuracy"])
            average = figure(lambda h: h["accuracy"])
            per_group = {g: figure(lambda h, g=g: h["groups"][g]["accuracy"]) for g in groups}
            summary[arm] = {"worst_group_accuracy": worst, "accuracy": average, **per_group}
            rows.append(
                [arm, *(f"{m:.3f} ± {s:.3f}" for m, s in (worst, average, *per_group.values()))]
            )
        print()
        print(table(["method", "worst-group acc", "average acc", *groups], rows))
        gain = [
            per_seed[s]["GR-DPO"]["held_out"]["worst_group_accuracy"]
            - per_seed[s]["DPO (TRL)"]["held_out"]["worst_group_accuracy"]
            for s in seeds
        ]
        print(f"\nGR-DPO - DPO worst-group accuracy per seed: {[round(g, 3) for g in gain]}")
        timing = speed(base, args) if not args.no_speed else None
        if timing:
            print(f"GR-DPO / TRL DPO steps/s: median {timing['median_ratio']:.3f}")
        figures = {
            "setup": {
                "pairs": args.pairs,
                "eval_pairs": args.eval_pairs,
                "epochs": args.epochs,
                "learning_rate": args.lr,
                "group_shares": {"plain": 0.8, "spaced": 0.2},
                "models": model_info({"small": base}),
            },
            "summary": summary,
            "gr_dpo_minus_dpo_worst_group": gain,
            "speed": timing,
            "per_seed": per_seed,
        }
        write_results("group_robust", args, seeds, figures, "cpu")


if __name__ == "__main__":
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--eval-pairs", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--speed-pairs", type=int, default=3000)
    parser.add_argument("--speed-repeats", type=int, default=4)
    parser.add_argument("--no-speed", action="store_true")
    main(parser.parse_args())
