"""Reward models on the world: Flywheel's Bradley-Terry training vs TRL's RewardTrainer
with its defaults, and a K=3 shared-backbone ensemble vs 3 separate reward models.

Pairs: world tasks, chosen = the correct answer, rejected = a plausible wrong one
(the answer reversed, or padded when reversing changes nothing). Same backbone
(world-small), same training pairs, held-out pairwise accuracy on other tasks.

    .venv/bin/python benchmarks/reward_models.py --quick --models data/_models
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from common import bench_env, make_parser, mean_std, model_info, table, world_models, write_results


def world_pairs(n: int, seed: int) -> list[dict]:
    from flywheel.world.tasks import answer_preference_pairs

    return answer_preference_pairs(n, random.Random(seed))


def trl_defaults(train: list[dict], evaluation: list[dict], backbone: Path, out: Path) -> dict:
    """TRL's RewardTrainer with its default RewardConfig (only paths and logging set)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        output_dir=str(out),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evaluation),
        processing_class=tok,
    )
    result = trainer.train()
    return {
        "eval_pairwise_accuracy": trainer.evaluate()["eval_accuracy"],
        "train_seconds": result.metrics["train_runtime"],
        "train_pairs_per_second": result.metrics["train_samples_per_second"],
        "learning_rate": args.learning_rate,
        "batch_size": args.per_device_train_batch_size,
        "epochs": args.num_train_epochs,
    }


def one_seed(seed: int, backbone: Path, work: Path, args: argparse.Namespace) -> dict:
    from flywheel.reward_models.bradley_terry import RewardTrainingConfig, train_reward_model
    from flywheel.reward_models.ensemble import EnsembleConfig, train_ensemble

    train, evaluation = world_pairs(args.pairs, seed), world_pairs(600, 10_000 + seed)
    out: dict = {}
    config = RewardTrainingConfig(base_model=str(backbone), seed=seed)
    bt = train_reward_model(train, evaluation, config, work / f"bt-{seed}")
    out["flywheel_bt"] = {
        "eval_pairwise_accuracy": bt["eval_pairwise_accuracy"],
        "train_seconds": bt["train_seconds"],
        "train_pairs_per_second": bt["train_samples_per_second"],
    }
    out["trl_defaults"] = trl_defaults(train, evaluation, backbone, work / f"trl-{seed}")

    started = time.perf_counter()
    separate = [
        train_reward_model(
            train, evaluation, config.model_copy(update={"seed": seed * 10 + k}), work / f"s{k}"
        )
        for k in range(3)
    ]
    out["three_separate"] = {
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": sum(s["train_seconds"] for s in separate),
        "eval_pairwise_accuracy": [s["eval_pairwise_accuracy"] for s in separate],
    }
    ens = EnsembleConfig(base_model=str(backbone), members=3, seed=seed)
    figures = train_ensemble(train, evaluation, ens, work / f"ens-{seed}")
    out["ensemble_k3"] = {
        "train_seconds": figures["train_seconds"],
        "eval_pairwise_accuracy": figures["eval_pairwise_accuracy"],
    }
    single = EnsembleConfig(base_model=str(backbone), members=2, seed=seed, bootstrap=False)
    # the same loop with the smallest ensemble, as the one-model reference for the ratio
    one = train_ensemble(train, evaluation, single, work / f"one-{seed}")
    out["ensemble_loop_k2"] = {"train_seconds": one["train_seconds"]}
    return out


def main(args: argparse.Namespace) -> None:
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    per_seed = {}
    with bench_env(args) as data:
        models = world_models(args, data)
        for seed in seeds:
            print(f"seed {seed}: {args.pairs} training pairs")
            per_seed[seed] = one_seed(seed, models["small"], data / "_bench", args)
        info = model_info(models)

    def avg(get) -> float:
        return mean_std([get(per_seed[s]) for s in seeds])[0]

    rows = [
        [
            "Flywheel BT (RewardTrainer, lr 1e-3, centering 0.01)",
            avg(lambda r: r["flywheel_bt"]["eval_pairwise_accuracy"]),
            avg(lambda r: r["flywheel_bt"]["train_pairs_per_second"]),
        ],
        [
            "TRL RewardTrainer, default config",
            avg(lambda r: r["trl_defaults"]["eval_pairwise_accuracy"]),
            avg(lambda r: r["trl_defaults"]["train_pairs_per_second"]),
        ],
    ]
    print("\nheld-out pairwise accuracy and training speed (world-small backbone)\n")
    print(table(["trainer", "held-out accuracy", "train pairs/s"], rows))
    one_model = avg(lambda r: r["flywheel_bt"]["train_seconds"])
    cost = [
        ["one BT model", one_model, 1.0],
        [
            "3 separate BT models",
            avg(lambda r: r["three_separate"]["train_seconds"]),
            avg(lambda r: r["three_separate"]["train_seconds"]) / one_model,
        ],
        [
            "K=3 ensemble, shared backbone",
            avg(lambda r: r["ensemble_k3"]["train_seconds"]),
            avg(lambda r: r["ensemble_k3"]["train_seconds"]) / one_model,
        ],
        [
            "K=2 ensemble, same loop (reference for the loop's own cost)",
            avg(lambda r: r["ensemble_loop_k2"]["train_seconds"]),
            avg(lambda r: r["ensemble_loop_k2"]["train_seconds"]) / one_model,
        ],
    ]
    print("\nensemble training cost (same pairs, one epoch)\n")
    print(table(["what", "train seconds", "x one model"], cost))
    ens_acc = avg(lambda r: r["ensemble_k3"]["eval_pairwise_accuracy"]["mean"])
    print(f"\nK=3 ensemble mean held-out accuracy: {ens_acc:.3f}")
    figures = {
        "pairs": args.pairs,
        "accuracy_and_speed": rows,
        "ensemble_cost": cost,
        "ensemble_mean_accuracy": ens_acc,
        "per_seed": per_seed,
        "models": info,
    }
    write_results("reward_models", args, seeds, figures, "cpu")


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3000, help="training pairs per seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    main(parser.parse_args())
