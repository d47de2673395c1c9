"""ARMAP on the shop world: triplets synthesized with the shop agent, a Bradley-Terry reward
model trained on them, and planning with it (best-of-N, Reflexion, MCTS) against the
sampled policy, in one run.

Per seed: ARMAP synthesis (world intents, the shop agent samples trajectories, intents
refined to the trajectories, triplets); `train_reward_model` on the world-small backbone;
held-out triplet accuracy (triplets from another catalog and seed); then every planner on
the same held-out intents of a third catalog. The env's true score as the reward model
(`EnvScoreOracle`) gives each planner's upper bound.

    .venv/bin/python benchmarks/armap_planners.py --quick --models data/_models  # 1 seed, ~5 min
    .venv/bin/python benchmarks/armap_planners.py --models data/_models  # 3 seeds, ~20 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import bench_env, make_parser, mean_std, model_info, table, world_models, write_results

EVAL_CATALOG_SEED = 777_777  # the planners' held-out intents; synthesis never uses it


def shop_agent(args: argparse.Namespace, models: dict[str, Path], data: Path) -> tuple[Path, dict]:
    """`--agent`, else `shop-agent` beside the world models, else trained into the data folder
    (the benchmark never writes into the project's data/)."""
    from flywheel.world.bootstrap import BootstrapConfig, bootstrap_shop_agent, shop_agent_dir

    candidates = [args.agent] if args.agent else [shop_agent_dir(models["small"].parent)]
    for path in candidates:
        if path is not None and (path / "config.json").exists():
            report_file = path / "bootstrap_report.json"
            report = json.loads(report_file.read_text()) if report_file.exists() else {}
            return path, report
    if args.agent:
        raise SystemExit(f"{args.agent} holds no model")
    print(
        "no shop-agent beside the world models: training one into the data folder "
        f"({BootstrapConfig().shop_agent_steps} steps)..."
    )
    # all the default steps, whatever the machine's load: the same agent on every run
    report = bootstrap_shop_agent(data / "_models", BootstrapConfig())
    return Path(report["path"]), report


def one_seed(
    seed: int, agent_path: Path, backbone: Path, work: Path, args: argparse.Namespace
) -> dict:
    from flywheel.llm import TransformersBackend
    from flywheel.reward_models.bradley_terry import (
        RewardModel,
        RewardTrainingConfig,
        train_reward_model,
    )
    from flywheel.store import Checkpoint
    from flywheel.synthesis.armap import ArmapConfig, synthesize_triplets
    from flywheel.synthesis.planners import (
        best_of_n,
        evaluate,
        mcts,
        plain,
        reflexion,
        reward_scores,
    )
    from flywheel.world.shop_agent import held_out_intents
    from flywheel.world.shop_env import EnvScoreOracle, ShopAgent, ShopEnvironment

    def shop(catalog_seed: int) -> ShopEnvironment:  # 120 items, price slack 15
        return ShopEnvironment.from_settings(catalog_seed=catalog_seed)

    out: dict = {}
    with TransformersBackend(agent_path, batch_size=256) as backend:
        agent = ShopAgent(backend, temperature=args.temperature, seed=seed)
        config = ArmapConfig(
            intents=args.intents,
            trajectories_per_intent=args.trajectories,
            temperature=args.temperature,
            seed=seed,
        )
        checkpoint = Checkpoint(work / "checkpoints")
        train, failures, synth = synthesize_triplets(
            config, None, agent, checkpoint, environment=shop(catalog_seed=seed)
        )
        held_out_config = config.model_copy(
            update={
                "intents": args.eval_intents,
                "seed": 10_000 + seed,
            }
        )
        held_out, _, _ = synthesize_triplets(
            held_out_config, None, agent, checkpoint, environment=shop(catalog_seed=10_000 + seed)
        )
        out["synthesis"] = {**synth, "failures": len(failures), "held_out_triplets": len(held_out)}
        print(
            f"  seed {seed}: {len(train)} triplets from {args.intents} intents "
            f"({synth['seconds']:.0f}s, agent success {synth['agent_success']:.2f}); "
            f"{len(held_out)} held-out triplets"
        )

        rm_config = RewardTrainingConfig(
            base_model=str(backbone),
            epochs=args.epochs,
            learning_rate=args.lr,
            max_length=256,
            seed=seed,
        )
        started = time.monotonic()
        trained = train_reward_model(train, held_out, rm_config, work / f"rm-{seed}")
        reward_model = RewardModel(work / f"rm-{seed}")
        out["reward_model"] = {
            "train_pairs": trained["train_rows"]["kept"],
            "held_out_triplet_accuracy": trained["eval_pairwise_accuracy"],
            "train_triplet_accuracy": trained["train_pairwise_accuracy"],
            "seconds": time.monotonic() - started,
        }
        print(
            f"  seed {seed}: reward model held-out triplet accuracy "
            f"{trained['eval_pairwise_accuracy']:.3f} ({out['reward_model']['seconds']:.0f}s)"
        )
        # Reflexion's threshold: halfway between the reward model's mean score of the
        # training positives and negatives (the training data only, no held-out peeking)
        chosen = reward_model.score([r["prompt"] for r in train], [r["chosen"] for r in train])
        rejected = reward_model.score([r["prompt"] for r in train], [r["rejected"] for r in train])
        threshold = (statistics.fmean(chosen) + statistics.fmean(rejected)) / 2
        out["reflexion_threshold"] = threshold

        catalog, intents = held_out_intents(args.planner_intents, seed=EVAL_CATALOG_SEED)
        environment = ShopEnvironment(catalog)
        out["planners"] = {}
        for temperature in args.planner_temperatures:
            # every planner plans over the same policy as the baseline it is compared with
            policy = ShopAgent(backend, temperature=temperature, seed=seed)
            planners = {
                "plain (sampled policy)": (plain(), None),
                f"best-of-{args.n}": (best_of_n(args.n), reward_model),
                f"reflexion ({args.trials} trials)": (
                    reflexion(args.trials, threshold),
                    reward_model,
                ),
                f"mcts ({args.simulations} sims, k={args.expand_k})": (
                    mcts(args.simulations, args.c_uct, expand_k=args.expand_k),
                    reward_model,
                ),
                f"best-of-{args.n}, oracle reward": (best_of_n(args.n), EnvScoreOracle()),
            }
            for name, (planner, scorer) in planners.items():
                figures = evaluate(planner, policy, scorer, intents, environment, seed=seed)
                out["planners"][f"T={temperature:g}: {name}"] = figures
                print(
                    f"  seed {seed}: T={temperature:g}: {name}: success "
                    f"{figures['success_rate']:.3f}, reward {figures['mean_reward']:.3f} "
                    f"({figures['seconds']:.1f}s)"
                )
        greedy = ShopAgent(backend, temperature=0.0, seed=seed)
        out["planners"]["greedy policy (reference)"] = evaluate(
            plain(), greedy, None, intents, environment, seed=seed
        )
        # how often the reward model ranks a successful episode above a failed one of
        # the same intent, on the planners' intents (the ranking best-of-N relies on)
        episodes = agent.rollout(
            [i for i in intents for _ in range(4)], environment, seed=seed + 99
        )
        scores = reward_scores(reward_model, episodes)
        wins = total = 0
        for k in range(len(intents)):
            group = list(zip(episodes[4 * k : 4 * k + 4], scores[4 * k : 4 * k + 4], strict=True))
            for good, good_score in group:
                for bad, bad_score in group:
                    if good.reward == 1.0 and bad.reward < 1.0:
                        total += 1
                        wins += good_score > bad_score
        out["reward_model"]["success_vs_failure_ranking"] = wins / total if total else None
    return out


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.intents, args.eval_intents, args.planner_intents = 400, 60, 100
        args.planner_temperatures = args.planner_temperatures[:1]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    per_seed = {}
    started = time.monotonic()
    with bench_env(args) as data:
        models = world_models(args, data)
        agent_path, agent_report = shop_agent(args, models, data)
        for seed in seeds:
            print(f"seed {seed}")
            per_seed[seed] = one_seed(
                seed, agent_path, models["small"], data / f"_bench{seed}", args
            )
        info = model_info(models)
    names = list(per_seed[seeds[0]]["planners"])

    def avg(get) -> tuple[float, float]:
        return mean_std([get(per_seed[s]) for s in seeds])

    rows = []
    for name in names:
        success = avg(lambda r, n=name: r["planners"][n]["success_rate"])
        reward = avg(lambda r, n=name: r["planners"][n]["mean_reward"])
        rows.append(
            [
                name,
                f"{success[0]:.3f} ± {success[1]:.3f}",
                f"{reward[0]:.3f} ± {reward[1]:.3f}",
                avg(lambda r, n=name: r["planners"][n]["mean_episodes"])[0],
                avg(lambda r, n=name: r["planners"][n]["mean_env_steps"])[0],
                avg(lambda r, n=name: r["planners"][n]["mean_model_calls"])[0],
                avg(lambda r, n=name: r["planners"][n]["mean_rm_calls"])[0],
                avg(lambda r, n=name: r["planners"][n]["seconds"])[0],
            ]
        )
    print(f"\nplanners on {args.planner_intents} held-out intents, mean ± std over seeds {seeds}\n")
    print(
        table(
            [
                "planner",
                "success",
                "mean reward",
                "episodes/intent",
                "env steps/intent",
                "agent calls/intent",
                "RM calls/intent",
                "seconds",
            ],
            rows,
        )
    )
    synthesis = [
        ["triplets", avg(lambda r: float(r["synthesis"]["triplets"]))[0]],
        ["agent success while synthesizing", avg(lambda r: r["synthesis"]["agent_success"])[0]],
        ["synthesis seconds", avg(lambda r: r["synthesis"]["seconds"])[0]],
        [
            "RM held-out triplet accuracy",
            avg(lambda r: r["reward_model"]["held_out_triplet_accuracy"])[0],
        ],
        [
            "RM train triplet accuracy",
            avg(lambda r: r["reward_model"]["train_triplet_accuracy"])[0],
        ],
        [
            "RM ranks a success above a failure (same intent)",
            avg(lambda r: r["reward_model"]["success_vs_failure_ranking"] or 0.0)[0],
        ],
        ["RM training seconds", avg(lambda r: r["reward_model"]["seconds"])[0]],
    ]
    print("\nsynthesis and reward model (means over seeds)\n")
    print(table(["figure", "value"], synthesis))
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    figures = {
        "settings": {
            k: getattr(args, k)
            for k in (
                "intents",
                "trajectories",
                "eval_intents",
                "planner_intents",
                "temperature",
                "planner_temperatures",
                "epochs",
                "lr",
                "n",
                "trials",
                "simulations",
                "expand_k",
                "c_uct",
            )
        },
        "planners": rows,
        "synthesis_and_reward_model": synthesis,
        "per_seed": per_seed,
        "shop_agent": {
            "path": str(agent_path),
            **{k: agent_report.get(k) for k in ("train", "eval", "parameters")},
        },
        "models": info,
        "total_seconds": time.monotonic() - started,
    }
    write_results("armap_planners", args, seeds, figures, "cpu")


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--agent", type=Path, help="a shop-agent model folder")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    parser.add_argument("--intents", type=int, default=600, help="synthesis intents per seed")
    parser.add_argument("--trajectories", type=int, default=6, help="trajectories per intent")
    parser.add_argument("--eval-intents", type=int, default=100, help="held-out triplet intents")
    parser.add_argument("--planner-intents", type=int, default=200, help="planner eval intents")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="agent temperature for synthesis"
    )
    parser.add_argument(
        "--planner-temperatures",
        type=float,
        nargs="+",
        default=[1.0, 0.5],
        help="agent temperatures to plan at (the plain baseline samples at the same one)",
    )
    parser.add_argument("--epochs", type=float, default=2.0, help="reward model epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="reward model learning rate")
    parser.add_argument("--n", type=int, default=8, help="best-of-N episodes")
    parser.add_argument("--trials", type=int, default=3, help="Reflexion trials")
    parser.add_argument("--simulations", type=int, default=8, help="MCTS simulations")
    parser.add_argument("--expand-k", type=int, default=3, help="MCTS actions per expansion")
    parser.add_argument("--c-uct", type=float, default=1.0, help="MCTS exploration constant")
    main(parser.parse_args())
