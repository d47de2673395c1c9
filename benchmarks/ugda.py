"""UGDA on the world: relabeling a budget of shifted-policy pairs chosen by uncertainty then
influence, by uncertainty alone, at random, or not at all; reward-model accuracy after.

Pre-shift: a K-member shared-backbone ensemble (world-small backbone) trained on the
teacher's pairs (the correct answer over the answer reversed). The shifted policy:
world-small sampling at temperature 1.5, whose mistakes are near misses, dropped or
extra letters and stray characters, not reversals. From disjoint prompt sets it gives
unlabeled candidate pairs, a small oracle-labelled validation set (for the influence
gradient only) and an oracle-labelled test set. The oracle grades a response by
check (right/wrong) + similarity to the correct answer; pairs whose grades differ by
at most --min-margin are ties (not preferences). Each arm sends the same budget of
candidates to the oracle and refines the same initial ensemble the same way
(relabeled pairs + as many replayed teacher pairs).

    .venv/bin/python benchmarks/ugda.py --quick --models data/_models   # 3 seeds, budget 200
    .venv/bin/python benchmarks/ugda.py --models data/_models           # 8 seeds, 100/200/400
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from common import bench_env, make_parser, mean_std, model_info, table, world_models, write_results

ARM_NAMES = {
    "uncertainty+influence": "(a) uncertainty then influence (UGDA)",
    "uncertainty+influence:abs_cosine": "(a') UGDA, influence by |cosine|",
    "uncertainty+influence:heads": "(a'') UGDA, gradient of the heads only",
    "uncertainty": "(b) uncertainty alone",
    "random": "(c) random",
    "none": "(d) no relabeling",
}
ARMS = tuple(ARM_NAMES)


def split_tasks(seed: int, sizes: list[int]) -> list[list]:
    """Disjoint task sets (no instruction in two sets), drawn from the seed's own stream."""
    from flywheel.world.tasks import sample_tasks

    rng = random.Random(50_000 + seed)
    seen: set[str] = set()
    pool = []
    while len(pool) < sum(sizes):
        for task in sample_tasks(sum(sizes), rng):
            if task.instruction not in seen and len(pool) < sum(sizes):
                seen.add(task.instruction)
                pool.append(task)
    out, start = [], 0
    for size in sizes:
        out.append(pool[start : start + size])
        start += size
    return out


def accuracy(model, tok, rows: list[dict]) -> dict:
    """Ensemble-mean pairwise accuracy on all labelled pairs and on the decisive ones
    (one response correct, the other not)."""
    from flywheel.reward_models.ensemble import pairwise_accuracy
    from flywheel.world.labelers import task_of_prompt
    from flywheel.world.tasks import check

    decisive = [
        r
        for r in rows
        if check(task_of_prompt(r["prompt"]), r["chosen"])
        != check(task_of_prompt(r["prompt"]), r["rejected"])
    ]
    return {
        "all": pairwise_accuracy(model, tok, rows)["mean"],
        "decisive": pairwise_accuracy(model, tok, decisive)["mean"] if decisive else None,
        "pairs": len(rows),
        "decisive_pairs": len(decisive),
    }


def projection_fidelity(
    init: Path, candidates: list[dict], validation: list[dict], scores: dict, config, budget: int
) -> dict:
    """How faithful the random projection is: rank correlation (Spearman) of the projected
    influence with the exact, unprojected cosine on the uncertain pool, and the overlap of
    the `budget` pairs each picks, per projection size."""
    import torch

    from flywheel.reward_models import ugda
    from flywheel.reward_models.ensemble import EnsembleRewardModel

    ensemble = EnsembleRewardModel(init)
    tok, model = ensemble.tok, ensemble.model
    pool = ugda.uncertain_pool(scores["variance"], config)
    rows = ugda.pseudo_labeled([candidates[i] for i in pool], [scores["p_mean"][i] for i in pool])
    direction = ugda.per_sample_grads(model, tok, validation, config.grad_params).mean(dim=0)
    grads = ugda.per_sample_grads(model, tok, rows, config.grad_params)
    exact = torch.nn.functional.cosine_similarity(grads, direction.unsqueeze(0), dim=1)

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort().argsort().float()

    top = set(exact.argsort(descending=True)[:budget].tolist())
    out = {"parameters": grads.shape[1], "pool": len(pool)}
    for dim in (256, 1024, 8192):
        projected = torch.tensor(
            ugda.influence_scores(
                ensemble,
                [candidates[i] for i in pool],
                validation,
                p_mean=[scores["p_mean"][i] for i in pool],
                projection_dim=dim,
                grad_params=config.grad_params,
                seed=config.seed,
            )
        )
        rho = torch.corrcoef(torch.stack([ranks(exact), ranks(projected)]))[0, 1].item()
        picked = set(projected.argsort(descending=True)[:budget].tolist())
        out[str(dim)] = {"spearman": rho, "top_overlap": len(top & picked) / budget}
    return out


def one_seed(seed: int, models: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    from flywheel.llm import TransformersBackend
    from flywheel.reward_models import ugda
    from flywheel.reward_models.ensemble import EnsembleConfig, load_ensemble, train_ensemble
    from flywheel.world.labelers import WorldOracleLabeler
    from flywheel.world.tasks import MAX_LEN, answer_preference_pairs

    out: dict = {}
    started = time.perf_counter()
    original = answer_preference_pairs(args.pairs, random.Random(seed))
    teacher_eval = answer_preference_pairs(300, random.Random(10_000 + seed))
    init = work / f"init-{seed}"
    config = EnsembleConfig(
        base_model=str(models["small"]), members=args.members, epochs=1.0, seed=seed
    )
    figures = train_ensemble(original, teacher_eval, config, init)
    out["init_teacher_accuracy"] = figures["eval_pairwise_accuracy"]["mean"]

    # the test prompts come first, so they do not change with the other sizes
    test_tasks, cand_tasks, val_tasks = split_tasks(
        seed, [args.test_prompts, args.candidate_prompts, args.validation_prompts]
    )
    oracle = WorldOracleLabeler(min_margin=args.min_margin)
    sampling = {"temperature": args.temperature, "max_new_tokens": MAX_LEN + 2}
    with TransformersBackend(models[args.policy], batch_size=128) as policy:
        candidates, cand_report = ugda.policy_pairs(
            policy, [t.prompt for t in cand_tasks], seed=seed, **sampling
        )
        val_pairs, _ = ugda.policy_pairs(
            policy, [t.prompt for t in val_tasks], seed=seed + 1, **sampling
        )
        test_pairs, _ = ugda.policy_pairs(
            policy, [t.prompt for t in test_tasks], seed=seed + 2, **sampling
        )
    validation, _ = oracle.label(val_pairs)
    test, test_ties = oracle.label(test_pairs)
    out["candidates"] = cand_report
    out["validation_pairs"] = len(validation)
    out["test_pairs"] = len(test)
    out["test_ties"] = len(test_ties)

    tok, model, _ = load_ensemble(init)
    out["none"] = accuracy(model, tok, test)
    base = ugda.UgdaConfig(
        arm="uncertainty+influence",
        budget=min(args.budgets),
        uncertain_fraction=args.fraction,
        projection_dim=args.projection_dim,
        grad_params=args.grad_params,
        refine_epochs=args.refine_epochs,
        refine_lr=args.refine_lr,
        replay=args.replay,
        seed=seed,
    )
    scored = time.perf_counter()
    variants = {
        "cosine": {},
        "abs_cosine": {"influence_sign": "abs_cosine"},
        "heads": {"grad_params": "heads"},
    }
    scores = {
        name: ugda.score_candidates(init, candidates, validation, base.model_copy(update=update))
        for name, update in variants.items()
    }
    out["scoring_seconds"] = time.perf_counter() - scored
    variance = scores["cosine"]["variance"]
    out["projection_fidelity"] = projection_fidelity(
        init, candidates, validation, scores["cosine"], base, min(args.budgets)
    )
    # which candidates the initial ensemble ranks wrongly (by the oracle, ties aside)
    truth = {r["id"]: r["label"] for r in oracle.label(candidates)[0]}
    p_mean = scores["cosine"]["p_mean"]
    wrong = {
        c["id"]
        for c, q in zip(candidates, p_mean, strict=True)
        if c["id"] in truth and (q >= 0.5) != (truth[c["id"]] == "a")
    }
    out["candidate_error_rate"] = len(wrong) / max(1, len(truth))

    for budget in args.budgets:
        for arm in ARMS:
            if arm == "none":
                continue
            name, variant = arm.split(":") if ":" in arm else (arm, "cosine")
            cfg = base.model_copy(update={"arm": name, "budget": budget})
            chosen = ugda.select(variance, scores[variant]["influence"], cfg)
            selected = [candidates[i] for i in chosen]
            labeled, failures = oracle.label(selected)
            refined = work / f"{arm.replace('+', '_').replace(':', '_')}-{budget}-{seed}"
            ugda.refine(init, labeled, original, teacher_eval, cfg, refined)
            tok, model, _ = load_ensemble(refined)
            out[f"{arm}@{budget}"] = {
                **accuracy(model, tok, test),
                "labeled": len(labeled),
                "ties": len(failures),
                "labeled_initially_wrong": sum(r["id"] in wrong for r in labeled)
                / max(1, len(labeled)),
            }
    out["seconds"] = time.perf_counter() - started
    return out


def main(args: argparse.Namespace) -> None:
    seeds = args.seeds or ([0, 1, 2] if args.quick else list(range(8)))
    args.budgets = args.budgets or ([200] if args.quick else [100, 200, 400])
    per_seed = {}
    with bench_env(args) as data:
        models = world_models(args, data)
        for seed in seeds:
            per_seed[seed] = one_seed(seed, models, data / "_bench", args)
            print(f"seed {seed}: {per_seed[seed]['seconds']:.0f}s")
        info = model_info(models)

    def ms(key: str, metric: str) -> tuple[float, float]:
        return mean_std([per_seed[s][key][metric] for s in seeds])

    rows = []
    for budget in args.budgets:
        for arm in ARMS:
            key = "none" if arm == "none" else f"{arm}@{budget}"
            acc, acc_sd = ms(key, "all")
            dec, dec_sd = ms(key, "decisive")
            row = [budget, ARM_NAMES[arm], f"{acc:.3f} ± {acc_sd:.3f}", f"{dec:.3f} ± {dec_sd:.3f}"]
            # paired over seeds (same initial ensemble, same test pairs): less noisy
            # than comparing the arms' means
            delta = mean_std(
                [per_seed[s][key]["all"] - per_seed[s][f"random@{budget}"]["all"] for s in seeds]
            )
            row.append(f"{delta[0]:+.3f} ± {delta[1]:.3f}")
            versus_b = mean_std(
                [
                    per_seed[s][key]["all"] - per_seed[s][f"uncertainty@{budget}"]["all"]
                    for s in seeds
                ]
            )
            row.append(f"{versus_b[0]:+.3f} ± {versus_b[1]:.3f}")
            if arm == "none":
                row += ["-", "-"]
            else:
                row += [ms(key, "labeled")[0], ms(key, "labeled_initially_wrong")[0]]
            rows.append(row)
    print(
        f"\nensemble-mean accuracy on {ms('none', 'pairs')[0]:.0f} held-out shifted-policy pairs "
        f"(world-{args.policy}, temperature {args.temperature}), {len(seeds)} seeds\n"
    )
    headers = [
        "budget",
        "arm",
        "accuracy, all test pairs",
        "accuracy, decisive test pairs",
        "vs (c), paired",
        "vs (b), paired",
        "labeled of budget",
        "labeled: initially wrong",
    ]
    print(table(headers, rows))
    fidelity = [
        [
            dim,
            *mean_std([per_seed[s]["projection_fidelity"][dim]["spearman"] for s in seeds]),
            mean_std([per_seed[s]["projection_fidelity"][dim]["top_overlap"] for s in seeds])[0],
        ]
        for dim in ("256", "1024", "8192")
    ]
    params = per_seed[seeds[0]]["projection_fidelity"]["parameters"]
    print(
        f"\nrandom projection of the {params}-entry gradient vs the exact cosine (uncertain pool)\n"
    )
    fid_headers = ["projection dim", "Spearman", "± std", f"top-{min(args.budgets)} overlap"]
    print(table(fid_headers, fidelity))
    figures = {
        "setting": {
            k: getattr(args, k)
            for k in (
                "pairs",
                "members",
                "policy",
                "temperature",
                "min_margin",
                "candidate_prompts",
                "validation_prompts",
                "test_prompts",
                "budgets",
                "fraction",
                "projection_dim",
                "grad_params",
                "refine_epochs",
                "refine_lr",
                "replay",
            )
        },
        "table": {"headers": headers, "rows": rows},
        "projection_fidelity": {"headers": fid_headers, "rows": fidelity},
        "per_seed": per_seed,
        "models": info,
    }
    write_results("ugda", args, seeds, figures, "cpu")


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0-7 (quick: 0 1 2)")
    parser.add_argument("--pairs", type=int, default=3000, help="teacher pairs, pre-shift")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--policy", choices=["small", "large"], default="small")
    parser.add_argument("--temperature", type=float, default=1.5)
    parser.add_argument("--min-margin", type=float, default=0.3, help="oracle: closer grades tie")
    parser.add_argument("--candidate-prompts", type=int, default=3000)
    parser.add_argument("--validation-prompts", type=int, default=500)
    parser.add_argument("--test-prompts", type=int, default=3000)
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        help="relabeling budgets (default 100 200 400; quick: 200)",
    )
    parser.add_argument("--fraction", type=float, default=0.3, help="uncertain_fraction")
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument(
        "--grad-params", choices=["heads", "heads+last_layer"], default="heads+last_layer"
    )
    parser.add_argument("--refine-epochs", type=float, default=10.0)
    parser.add_argument("--refine-lr", type=float, default=1e-3)
    parser.add_argument("--replay", type=float, default=1.0)
    main(parser.parse_args())
