"""Collaborative decoders on the world: Co-LLM (a fine-tuned world-small that learns when to
defer to a frozen world-large) against each model alone and against world-small fine-tuned by
plain NLL; token-level hybrid gating (entropy / top probability) as accuracy vs tokens sent to
world-large; Collab (mixture of agents steered by a Bradley-Terry target reward) against each
agent alone and best-of-N at equal model calls; and the decoders' speed against the models' own
`generate`.

    .venv/bin/python benchmarks/decoders.py --quick --models data/_models
    .venv/bin/python benchmarks/decoders.py --models data/_models
    .venv/bin/python benchmarks/decoders.py --arch llama-0.5b --device cuda   # speed only, GPU

All sections use the same test set: `held_out_tasks` (seed 10,000). Training and validation
tasks come from other seeds, with any instruction that is also a test instruction dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    bench_env,
    make_parser,
    mean_std,
    model_info,
    table,
    world_models,
    write_results,
)

FAMILY_ORDER = ("copy", "count", "dedup", "reverse", "shift", "sort")
# 0..1 in steps of 0.1, plus values near 1: the trained deferral head's P(defer) crowds there
ETAS = tuple(sorted({round(i / 10, 1) for i in range(11)} | {0.95, 0.98, 0.99, 0.995, 0.999}))
# "1e9" stands for infinity: hybrid_decode wants a finite entropy threshold
ENTROPY_THRESHOLDS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 1e9)
MAX_PROB_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
AGENTS = ("world-small", "world-large")  # Collab's agents, in this order
MIDDLE_ENTROPY = 0.5  # the hybrid threshold timed in the speed section (world mode)
# real-architecture shapes for `--arch` (speed only; random weights, nothing downloaded)
ARCHS: dict[str, dict[str, dict[str, int]]] = {
    "llama-0.5b": {
        # about 0.65B parameters: the assistant / large model
        "large": dict(
            hidden_size=1536,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=12,
            num_key_value_heads=4,
        ),
        # about 0.1B parameters: the base / small model
        "small": dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
        ),
    }
}
ARCH_VOCAB = 32_000


# --- data ---


def task_splits(args: argparse.Namespace) -> dict[str, Any]:
    """Test = held_out_tasks; train (seed 1) and validation (seed 2) minus test instructions
    (validation also minus training instructions)."""
    from flywheel.world.bootstrap import held_out_tasks
    from flywheel.world.tasks import sample_tasks

    test = held_out_tasks(args.test_tasks)
    seen = {t.instruction for t in test}
    train_all = sample_tasks(args.train_tasks, random.Random(1))
    train = [t for t in train_all if t.instruction not in seen]
    seen |= {t.instruction for t in train}
    val_all = sample_tasks(args.val_tasks, random.Random(2))
    val = [t for t in val_all if t.instruction not in seen]
    return {
        "test": test,
        "train": train,
        "val": val,
        "dropped": {"train": len(train_all) - len(train), "val": len(val_all) - len(val)},
    }


def accuracy(tasks: Sequence, texts: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per family plus "all"."""
    from flywheel.world.training import accuracy_by_family

    return accuracy_by_family(tasks, texts)


def greedy_texts(lm, prompts: Sequence[str], max_new: int) -> list[str]:
    from flywheel.decoders.stepping import decode_text, greedy_decode

    return [decode_text(lm, ids) for ids in greedy_decode(lm, prompts, max_new)]


def sync(device: str) -> None:
    """Wait for queued GPU work, so perf_counter measures it."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- 1. Co-LLM ---


def eta_curve(model, assistant, tasks: Sequence, args: argparse.Namespace) -> dict[float, dict]:
    """Test accuracy per family and deferred share at every eta."""
    from flywheel.decoders.co_llm import ASSISTANT, co_llm_decode

    prompts = [t.prompt for t in tasks]
    curve = {}
    for eta in ETAS:
        out = co_llm_decode(model, assistant, prompts, eta=eta, max_new_tokens=args.max_new)
        curve[eta] = {**accuracy(tasks, out.texts), "deferred": out.share(ASSISTANT)}
    return curve


def co_llm_seed(
    seed: int, paths: dict[str, Path], splits: dict, work: Path, args: argparse.Namespace
) -> tuple[dict, Any]:
    """One seed: Co-LLM trained from world-small with world-large as assistant; the head-only
    ablation; world-small fine-tuned by NLL on the same examples and steps. Returns the figures
    and the trained Co-LLM (for the speed section)."""
    import torch

    from flywheel.decoders.co_llm import (
        CoLLM,
        TrainingPhase,
        assistant_targets,
        init_head_weak,
        sweep_eta,
        train_co_llm,
    )
    from flywheel.decoders.stepping import CausalLM
    from flywheel.llm.training import train_causal_lm
    from flywheel.world.tasks import check

    test, val = splits["test"], splits["val"]
    examples = [(t.prompt, t.answer) for t in splits["train"]]
    large = CausalLM.load(paths["large"], device=args.device)
    val_prompts = [t.prompt for t in val]

    def score(prompts: list, texts: list[str], answers: list) -> list[float]:
        return [check(task, text) for task, text in zip(val, texts, strict=True)]

    def chosen_and_curve(model) -> dict:
        sweep = sweep_eta(
            model, large, val_prompts, scorer=score, etas=ETAS, max_new_tokens=args.max_new
        )
        return {"val": sweep, "test": eta_curve(model, large, test, args)}

    out: dict = {}
    targets_path = work / "assistant_targets.pt"  # the assistant's log-probs, shared by seeds
    # Co-LLM as the paper trains it: weak-supervision head init, then base + head on the
    # marginal likelihood; train_co_llm fine-tunes the base in place, so a fresh load per seed
    torch.manual_seed(seed)  # the head's initial weights
    model, stats = train_co_llm(
        CausalLM.load(paths["small"], device=args.device),
        large,
        examples,
        targets_path=targets_path,
        init_steps=args.init_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        head_lr=args.head_lr,
        lr=args.lr,
        seed=seed,
    )
    out["co_llm"] = {"train": stats, **chosen_and_curve(model)}
    print(f"  [co-llm] seed {seed}: trained in {stats['marginal']['seconds']:.1f} s", flush=True)

    # ablation: the weak-supervision head alone on the untouched world-small (no marginal step)
    torch.manual_seed(seed)
    head_only = CoLLM(CausalLM.load(paths["small"], device=args.device))
    targets = assistant_targets(large, examples, path=targets_path)
    phase = TrainingPhase(args.init_steps, args.batch_size, args.head_lr, seed)
    init = init_head_weak(head_only, examples, targets, phase)
    out["head_only"] = {"train": init, **chosen_and_curve(head_only)}

    # the fair baseline: world-small fine-tuned alone by NLL, same examples, steps, batch, lr
    tuned = CausalLM.load(paths["small"], device=args.device)
    nll = train_causal_lm(
        tuned.model,
        tuned.tokenizer,
        examples,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
    )
    texts = greedy_texts(tuned, [t.prompt for t in test], args.max_new)
    out["nll_finetuned"] = {"train": nll, "test": accuracy(test, texts)}
    print(f"  [co-llm] seed {seed}: head-only ablation and NLL baseline done", flush=True)
    return out, model


def co_llm_section(
    seeds: Sequence[int], paths: dict[str, Path], splits: dict, work: Path, args
) -> tuple[dict, Any]:
    """Every seed, then the tables: baselines, accuracy vs eta, per family at every eta."""
    from flywheel.decoders.stepping import CausalLM

    test = splits["test"]
    prompts = [t.prompt for t in test]
    alone = {}
    for size in ("small", "large"):
        lm = CausalLM.load(paths[size], device=args.device)
        alone[size] = accuracy(test, greedy_texts(lm, prompts, args.max_new))
    per_seed, first_model = {}, None
    for seed in seeds:
        print(f"[co-llm] seed {seed}", flush=True)
        per_seed[seed], model = co_llm_seed(seed, paths, splits, work, args)
        if first_model is None:
            first_model = model

    def ms(values: Sequence[float]) -> str:
        mean, std = mean_std(values)
        return f"{mean:.3f} ± {std:.3f}"

    def at_chosen(variant: str, key: str) -> list[float]:
        rows = [per_seed[s][variant] for s in seeds]
        return [r["test"][r["val"]["recommended_eta"]][key] for r in rows]

    def curve(variant: str, eta: float, key: str) -> list[float]:
        return [per_seed[s][variant]["test"][eta][key] for s in seeds]

    variants = ("co_llm", "head_only")
    chosen = {v: [per_seed[s][v]["val"]["recommended_eta"] for s in seeds] for v in variants}
    system_rows = [
        ["world-small alone (greedy)", f"{alone['small']['all']:.3f}", "0"],
        ["world-large alone (greedy)", f"{alone['large']['all']:.3f}", "1"],
        [
            "world-small fine-tuned by NLL (same examples and steps)",
            ms([per_seed[s]["nll_finetuned"]["test"]["all"] for s in seeds]),
            "0",
        ],
        [
            f"Co-LLM at the validation eta ({chosen['co_llm']})",
            ms(at_chosen("co_llm", "all")),
            ms(at_chosen("co_llm", "deferred")),
        ],
        ["Co-LLM's base alone (eta 1)", ms(curve("co_llm", 1.0, "all")), "0"],
        [
            f"head only, base not fine-tuned, at the validation eta ({chosen['head_only']})",
            ms(at_chosen("head_only", "all")),
            ms(at_chosen("head_only", "deferred")),
        ],
    ]
    system_table = table(["system", "accuracy", "share of tokens by world-large"], system_rows)
    eta_rows = [
        [
            eta,
            ms(curve("co_llm", eta, "all")),
            ms(curve("co_llm", eta, "deferred")),
            ms(curve("head_only", eta, "all")),
            ms(curve("head_only", eta, "deferred")),
        ]
        for eta in ETAS
    ]
    eta_table = table(
        ["eta", "Co-LLM accuracy", "deferred", "head-only accuracy", "head-only deferred"],
        eta_rows,
    )
    families = [f for f in FAMILY_ORDER if f in alone["small"]]

    def fam_row(name: str, get: Callable[[str], list[float]], deferred: str) -> list:
        means = [f"{statistics.fmean(get(f)):.3f}" for f in [*families, "all"]]
        return [name, *means, deferred]

    fam_rows = [
        fam_row("world-small", lambda f: [alone["small"][f]], "0"),
        fam_row("world-large", lambda f: [alone["large"][f]], "1"),
        fam_row(
            "world-small, NLL fine-tuned",
            lambda f: [per_seed[s]["nll_finetuned"]["test"][f] for s in seeds],
            "0",
        ),
        fam_row(
            "Co-LLM, validation eta",
            lambda f: at_chosen("co_llm", f),
            f"{statistics.fmean(at_chosen('co_llm', 'deferred')):.3f}",
        ),
    ]
    for eta in ETAS:
        fam_rows.append(
            fam_row(
                f"Co-LLM, eta {eta}",
                lambda f, eta=eta: curve("co_llm", eta, f),
                f"{statistics.fmean(curve('co_llm', eta, 'deferred')):.3f}",
            )
        )
    fam_table = table(["system", *families, "all", "deferred"], fam_rows)
    # the paper's two claims, read off the means
    mean_at = {eta: statistics.fmean(curve("co_llm", eta, "all")) for eta in ETAS}
    share_at = {eta: statistics.fmean(curve("co_llm", eta, "deferred")) for eta in ETAS}
    minority = [eta for eta in ETAS if share_at[eta] < 0.5]
    best_minority = max(minority, key=mean_at.__getitem__) if minority else None
    nll_mean = statistics.fmean(per_seed[s]["nll_finetuned"]["test"]["all"] for s in seeds)
    chosen_mean = statistics.fmean(at_chosen("co_llm", "all"))
    claims = {
        "co_llm_at_validation_eta": chosen_mean,
        "beats_small": chosen_mean > alone["small"]["all"],
        "beats_large": chosen_mean > alone["large"]["all"],
        "beats_nll_finetuned_small": chosen_mean > nll_mean,
        "paired_minus_large": [
            per_seed[s]["co_llm"]["test"][per_seed[s]["co_llm"]["val"]["recommended_eta"]]["all"]
            - alone["large"]["all"]
            for s in seeds
        ],
        "best_eta_with_deferral_below_half": best_minority,
        "accuracy_there": mean_at.get(best_minority) if best_minority is not None else None,
        "deferred_there": share_at.get(best_minority) if best_minority is not None else None,
    }
    figures = {
        "alone": alone,
        "per_seed": per_seed,
        "chosen_etas": chosen,
        "claims": claims,
        "system_table": system_table,
        "eta_table": eta_table,
        "family_table": fam_table,
    }
    return figures, first_model


# --- 2. hybrid gating ---


def hybrid_section(paths: dict[str, Path], splits: dict, args: argparse.Namespace) -> dict:
    """Accuracy vs share of tokens sent to world-large, for both measures (deterministic)."""
    from flywheel.decoders.hybrid import LARGE, hybrid_decode
    from flywheel.decoders.stepping import CausalLM

    small = CausalLM.load(paths["small"], device=args.device)
    large = CausalLM.load(paths["large"], device=args.device)
    test = splits["test"]
    prompts = [t.prompt for t in test]
    rows = []
    for measure, thresholds in (("entropy", ENTROPY_THRESHOLDS), ("max_prob", MAX_PROB_THRESHOLDS)):
        for threshold in thresholds:
            out = hybrid_decode(
                small,
                large,
                prompts,
                threshold=threshold,
                measure=measure,
                max_new_tokens=args.max_new,
            )
            acc = accuracy(test, out.texts)
            rows.append(
                {"measure": measure, "threshold": threshold, **acc, "to_large": out.share(LARGE)}
            )
    print("[hybrid] done", flush=True)
    alone = {
        size: accuracy(test, greedy_texts(lm, prompts, args.max_new))
        for size, lm in (("small", small), ("large", large))
    }
    table_rows = [["world-small alone", "-", alone["small"]["all"], 0.0]]
    for r in rows:
        threshold = "1e9 (never)" if r["threshold"] >= 1e9 else r["threshold"]
        table_rows.append([r["measure"], threshold, r["all"], r["to_large"]])
    table_rows.append(["world-large alone", "-", alone["large"]["all"], 1.0])
    return {
        "alone": alone,
        "rows": rows,
        "table": table(["measure", "threshold", "accuracy", "share to world-large"], table_rows),
    }


# --- 3. Collab ---


def reward_model(paths: dict[str, Path], splits: dict, work: Path, args) -> tuple[Any, dict]:
    """A Bradley-Terry target reward on world answer pairs, world-small backbone (as the
    `reward/train` flow configures it); pairs whose prompt is a test prompt are dropped."""
    from flywheel.reward_models.bradley_terry import (
        RewardModel,
        RewardTrainingConfig,
        train_reward_model,
    )
    from flywheel.world.tasks import answer_preference_pairs

    test_prompts = {t.prompt for t in splits["test"]}
    train = [
        r
        for r in answer_preference_pairs(args.rm_pairs, random.Random(3))
        if r["prompt"] not in test_prompts
    ]
    evaluation = [
        r for r in answer_preference_pairs(600, random.Random(4)) if r["prompt"] not in test_prompts
    ]
    config = RewardTrainingConfig(base_model=str(paths["small"]), seed=0)
    report = train_reward_model(train, evaluation, config, work / "target-rm")
    rm = RewardModel(work / "target-rm")
    rm.model.to(args.device)
    figures = {
        "train_pairs": len(train),
        "eval_pairs": len(evaluation),
        "eval_pairwise_accuracy": report["eval_pairwise_accuracy"],
        "train_pairwise_accuracy": report["train_pairwise_accuracy"],
        "train_seconds": report["train_seconds"],
    }
    return rm, figures


def collab_summary(tasks: Sequence, outputs: Sequence) -> dict:
    """Accuracy, mean target reward, calls, switches and world-large's share of tokens."""
    tokens = [a for o in outputs for a in o.agents]
    return {
        "accuracy": accuracy(tasks, [o.completion for o in outputs])["all"],
        "reward": statistics.fmean(o.reward for o in outputs if o.reward is not None),
        "model_calls": statistics.fmean(o.model_calls for o in outputs),
        "switches": statistics.fmean(o.switches for o in outputs),
        "large_share": sum(tokens) / len(tokens) if tokens else 0.0,
        "failures": sum(len(o.failures) for o in outputs),
    }


def collab_section(
    seeds: Sequence[int], paths: dict[str, Path], splits: dict, work: Path, args
) -> dict:
    """Each agent alone, Collab at each alpha (and with the oracle reward), best-of-N of the
    best agent at Collab's calls per prompt (seeds: its sampling seeds)."""
    from flywheel.decoders.collab import best_of_n_decode, collab_decode
    from flywheel.llm import TransformersBackend
    from flywheel.world.tasks import check

    tasks = splits["test"][: args.collab_tasks]
    prompts = [t.prompt for t in tasks]
    by_prompt = {t.prompt: t for t in tasks}
    rm, rm_figures = reward_model(paths, splits, work, args)
    print(f"[collab] target RM: held-out pairwise {rm_figures['eval_pairwise_accuracy']:.3f}")

    def oracle(ps: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The world's own check as the reward: what Collab's search reaches with a perfect
        target reward (a ceiling, not a method)."""
        return [check(by_prompt[p], c) for p, c in zip(ps, completions, strict=True)]

    out: dict = {"reward_model": rm_figures, "tasks": len(tasks)}
    with contextlib.ExitStack() as stack:
        agents = [
            stack.enter_context(
                TransformersBackend(paths[s], device=args.device, batch_size=args.collab_batch)
            )
            for s in ("small", "large")
        ]
        correct = rm.score(prompts, [t.answer for t in tasks])
        out["correct_answers_reward"] = statistics.fmean(correct)
        alone = {}
        for name, agent in zip(AGENTS, agents, strict=True):
            texts = agent.generate(prompts, max_new_tokens=args.max_new)
            rewards = rm.score(prompts, texts)
            # how well the target reward tells right from this agent's own wrong answers
            wrong = [i for i, t in enumerate(tasks) if not check(t, texts[i])]
            alone[name] = {
                "accuracy": accuracy(tasks, texts)["all"],
                "reward": statistics.fmean(rewards),
                "rm_prefers_correct_over_own_wrong": statistics.fmean(
                    correct[i] > rewards[i] for i in wrong
                ),
            }
        out["alone"] = alone
        collab = {}
        for alpha in args.alphas:
            started = time.perf_counter()
            outputs = collab_decode(
                agents,
                rm.score,
                prompts,
                k=args.k,
                rollout_len=args.rollout_len,
                alpha=alpha,
                max_new_tokens=args.max_new,
            )
            seconds = time.perf_counter() - started
            collab[alpha] = {**collab_summary(tasks, outputs), "seconds": seconds}
            print(f"[collab] alpha {alpha}: {collab[alpha]['seconds']:.1f} s", flush=True)
        out["collab"] = collab
        outputs = collab_decode(
            agents,
            oracle,
            prompts,
            k=args.k,
            rollout_len=args.rollout_len,
            alpha=0.1,
            max_new_tokens=args.max_new,
        )
        out["collab_oracle"] = collab_summary(tasks, outputs)

        # best-of-N from each agent (the paper's baseline: the best single agent, by mean target
        # reward) at Collab's calls per prompt (mean over the alphas) rounded down and up. One
        # run at the larger N: its first N draws are the draws of best_of_n_decode(..., N), as
        # draw d is seeded seed + d.
        best = max(alone, key=lambda name: alone[name]["reward"])
        calls = statistics.fmean(c["model_calls"] for c in collab.values())
        ns = sorted({math.floor(calls), math.ceil(calls)})
        bon: dict[str, dict[int, dict[str, list[float]]]] = {
            name: {n: {"accuracy": [], "reward": [], "oracle_accuracy": []} for n in ns}
            for name in AGENTS
        }
        for seed in seeds:
            for name, agent in zip(AGENTS, agents, strict=True):
                draws = best_of_n_decode(
                    agent,
                    rm.score,
                    prompts,
                    max(ns),
                    max_new_tokens=args.max_new,
                    temperature=1.0,
                    seed=1000 * seed,
                )
                for n in ns:
                    picks = [d.samples[max(range(n), key=d.rewards.__getitem__)] for d in draws]
                    hits = [
                        max(check(t, s) for s in d.samples[:n])
                        for t, d in zip(tasks, draws, strict=True)
                    ]
                    bon[name][n]["accuracy"].append(accuracy(tasks, picks)["all"])
                    bon[name][n]["reward"].append(
                        statistics.fmean(max(d.rewards[:n]) for d in draws)
                    )
                    bon[name][n]["oracle_accuracy"].append(statistics.fmean(hits))
            print(f"[collab] best-of-{max(ns)} seed {seed} done", flush=True)
        out["best_of_n"] = {"best_agent": best, "temperature": 1.0, "by_agent": bon}

    def ms(values: Sequence[float]) -> str:
        mean, std = mean_std(values)
        return f"{mean:.3f} ± {std:.3f}"

    rows = [
        [f"{name} alone (greedy)", a["accuracy"], a["reward"], 1, 0, "0" if "small" in name else 1]
        for name, a in alone.items()
    ]
    for alpha, c in collab.items():
        rows.append(
            [
                f"Collab, alpha {alpha}",
                c["accuracy"],
                c["reward"],
                f"{c['model_calls']:.1f}",
                f"{c['switches']:.2f}",
                c["large_share"],
            ]
        )
    c = out["collab_oracle"]
    rows.append(
        [
            "Collab, alpha 0.1, oracle reward (check) instead of the RM",
            c["accuracy"],
            "-",
            f"{c['model_calls']:.1f}",
            f"{c['switches']:.2f}",
            c["large_share"],
        ]
    )
    for name in sorted(AGENTS, key=lambda name: name != best):  # the best agent first
        mark = " (best agent by reward)" if name == best else ""
        for n in ns:
            by_n = bon[name][n]
            label = f"best-of-{n}, {name}{mark}, T=1"
            rows.append([label, ms(by_n["accuracy"]), ms(by_n["reward"]), n, "-", "-"])
    n = round(calls)
    for name in AGENTS:
        oracle_acc = ms(bon[name][n]["oracle_accuracy"])
        label = f"best-of-{n}, {name}, oracle reward (any draw correct)"
        rows.append([label, oracle_acc, "-", n, "-", "-"])
    reference = out["correct_answers_reward"]
    rows.append(["the correct answers (reference)", 1.0, reference, "-", "-", "-"])
    out["table"] = table(
        [
            "system",
            "accuracy",
            "mean target reward",
            "model calls / prompt",
            "switches / prompt",
            "tokens by world-large",
        ],
        rows,
    )
    return out


# --- 4. speed ---


def generate_tokens(lm, prompts: Sequence[str], max_new: int, batch_size: int) -> int:
    """transformers' own greedy `generate` on left-padded batches; the tokens written, each row
    cut after its first EOS (as the decoders count them)."""
    import torch

    from flywheel.decoders.stepping import chunks

    tok, eos = lm.tokenizer, lm.eos_ids
    tok.padding_side = "left"
    written = 0
    for idx in chunks(len(prompts), batch_size):
        enc = tok([prompts[i] for i in idx], padding=True, return_tensors="pt")
        enc = {k: v.to(lm.model.device) for k, v in enc.items()}
        with torch.inference_mode():
            seqs = lm.model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        for row in seqs[:, enc["input_ids"].shape[1] :].tolist():
            written += next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
    return written


def timed_rates(
    runners: dict[str, Callable[[], int]], repeats: int, device: str
) -> dict[str, list[float]]:
    """Tokens/s of every runner: one warm-up each, then `repeats` rounds in alternating order
    (so every runner sees the same machine load)."""
    for run in runners.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            sync(device)
            started = time.perf_counter()
            tokens = runners[name]()
            sync(device)
            rates[name].append(tokens / (time.perf_counter() - started))
    return rates


def speed_section(
    model, small, large, prompts: Sequence[str], etas: dict[str, float], threshold: float, args
) -> dict:
    """Co-LLM and hybrid tokens/s against the models' own generate, same prompts, batch size
    and max_new_tokens; ratios paired per round, median and range."""
    from flywheel.decoders.co_llm import ASSISTANT, co_llm_decode
    from flywheel.decoders.hybrid import LARGE, hybrid_decode

    bs, new = args.speed_batch, args.speed_new_tokens
    shares: dict[str, float] = {}

    def co_llm(eta: float, key: str) -> Callable[[], int]:
        def run() -> int:
            out = co_llm_decode(model, large, prompts, eta=eta, max_new_tokens=new, batch_size=bs)
            shares[key] = out.share(ASSISTANT)
            return sum(len(r) for r in out.token_ids)

        return run

    def hybrid() -> int:
        out = hybrid_decode(
            small, large, prompts, threshold=threshold, max_new_tokens=new, batch_size=bs
        )
        shares["hybrid"] = out.share(LARGE)
        return sum(len(r) for r in out.token_ids)

    runners: dict[str, Callable[[], int]] = {
        "generate, Co-LLM's base": lambda: generate_tokens(model.base, prompts, new, bs),
        "generate, small": lambda: generate_tokens(small, prompts, new, bs),
        "generate, large": lambda: generate_tokens(large, prompts, new, bs),
    }
    for label, eta in etas.items():
        runners[f"Co-LLM, {label}"] = co_llm(eta, f"Co-LLM, {label}")
    runners["hybrid"] = hybrid
    rates = timed_rates(runners, args.speed_repeats, args.device)

    def ratio(name: str, ref: str) -> dict:
        paired = [a / b for a, b in zip(rates[name], rates[ref], strict=True)]
        return {
            "median": statistics.median(paired),
            "min": min(paired),
            "max": max(paired),
            "rate": statistics.median(rates[name]),
            "ref_rate": statistics.median(rates[ref]),
        }

    ratios = {}
    for label in etas:
        name = f"Co-LLM, {label}"
        ratios[f"{name} / generate, Co-LLM's base"] = ratio(name, "generate, Co-LLM's base")
        ratios[f"{name} / generate, large"] = ratio(name, "generate, large")
    ratios["hybrid / generate, small"] = ratio("hybrid", "generate, small")
    ratios["hybrid / generate, large"] = ratio("hybrid", "generate, large")
    rows = []
    for key, r in ratios.items():
        name, ref = key.split(" / ")
        rows.append(
            [
                name,
                ref,
                f"{r['rate']:.0f}",
                f"{r['ref_rate']:.0f}",
                f"{r['median']:.2f}",
                f"{r['min']:.2f}–{r['max']:.2f}",
                shares[name],
            ]
        )
    return {
        "prompts": len(prompts),
        "batch_size": bs,
        "max_new_tokens": new,
        "repeats": args.speed_repeats,
        "etas": etas,
        "hybrid_entropy_threshold": threshold,
        "rates": rates,
        "shares": shares,
        "ratios": ratios,
        "table": table(
            [
                "decoder",
                "against",
                "tokens/s",
                "reference tokens/s",
                "ratio (median)",
                "range",
                "share by the larger model",
            ],
            rows,
        ),
    }


# --- --arch: random-weight models of a real architecture (speed only) ---


def arch_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """Random-weight LlamaForCausalLM small and large of `ARCHS[args.arch]`, shrunk by
    `--arch-scale` (hidden, intermediate and layers divided by it), bf16 on a GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flywheel.decoders.stepping import CausalLM
    from flywheel.world.models import char_tokenizer

    tok = char_tokenizer(ARCH_VOCAB)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    lms = []
    for size in ("small", "large"):
        shape = dict(ARCHS[args.arch][size])
        s = args.arch_scale
        heads = shape["num_attention_heads"]
        shape["hidden_size"] = max(heads * 4, shape["hidden_size"] // s // heads * heads)
        shape["intermediate_size"] = max(8, shape["intermediate_size"] // s)
        shape["num_hidden_layers"] = max(1, shape["num_hidden_layers"] // s)
        config = LlamaConfig(
            vocab_size=len(tok),
            max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
            **shape,
        )
        torch.manual_seed(0 if size == "small" else 1)
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        params = sum(p.numel() for p in model.parameters())
        print(f"[arch] {size}: {params / 1e6:.1f}M parameters, {shape}", flush=True)
        lms.append(CausalLM(model, tok, f"{args.arch}-{size}-random"))
    return lms[0], lms[1]


def arch_speed(args: argparse.Namespace) -> dict:
    """Speed only: a Co-LLM with an untrained, random deferral head on the random small model
    (the assistant: the random large one) and hybrid gating at the median entropy."""
    import torch

    from flywheel.decoders.co_llm import CoLLM
    from flywheel.decoders.stepping import CausalStepper, prompt_ids
    from flywheel.world.bootstrap import held_out_tasks

    small, large = arch_models(args)
    prompts = [t.prompt for t in held_out_tasks(args.speed_prompts)]
    torch.manual_seed(0)
    model = CoLLM(small).eval()
    # a middle threshold: the median entropy of the small model's first token over the prompts
    first = CausalStepper(small, [prompt_ids(small.tokenizer, p) for p in prompts])
    logp = torch.log_softmax(first.logits.double(), dim=-1)
    entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
    threshold = float(entropy.median())
    etas = {"eta 1 (never defers)": 1.0, "eta 0.5 (random head)": 0.5}
    params = {
        size: sum(p.numel() for p in lm.model.parameters())
        for size, lm in (("small", small), ("large", large))
    }
    out = speed_section(model, small, large, prompts, etas, threshold, args)
    return {"arch": args.arch, "arch_scale": args.arch_scale, "parameters": params, **out}


# --- main ---


def main(args: argparse.Namespace) -> None:
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    started = time.perf_counter()
    if args.arch:
        import torch

        torch.set_num_threads(args.threads)
        figures = {"speed": arch_speed(args), "seconds": time.perf_counter() - started}
        print("\nspeed (random weights)\n\n" + figures["speed"]["table"])
        args.out = args.out or RESULTS / f"decoders.{args.arch}.{args.device.split(':')[0]}.json"
        write_results("decoders", args, [], figures, args.device)
        return
    if args.out is None and not args.quick:
        args.out = RESULTS / "decoders.full.json"
    with bench_env(args) as data:
        paths = world_models(args, data)
        work = data / "_bench"
        work.mkdir(parents=True, exist_ok=True)
        splits = task_splits(args)
        print(
            f"tasks: {len(splits['train'])} train, {len(splits['val'])} validation, "
            f"{len(splits['test'])} test (dropped as test overlaps: {splits['dropped']})",
            flush=True,
        )
        figures: dict[str, Any] = {
            "tasks": {k: len(splits[k]) for k in ("train", "val", "test")},
            "dropped_overlaps": splits["dropped"],
            "max_new_tokens": args.max_new,
            "co_llm_training": {
                "init_steps": args.init_steps,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "head_lr": args.head_lr,
                "lr": args.lr,
            },
            "etas": ETAS,
        }
        figures["co_llm"], model = co_llm_section(seeds, paths, splits, work, args)
        figures["hybrid"] = hybrid_section(paths, splits, args)
        figures["collab"] = collab_section(seeds, paths, splits, work, args)
        figures["collab"]["config"] = {"k": args.k, "rollout_len": args.rollout_len}

        print("[speed] timing", flush=True)
        from flywheel.decoders.stepping import CausalLM

        small = CausalLM.load(paths["small"], device=args.device)
        large = CausalLM.load(paths["large"], device=args.device)
        recommended = figures["co_llm"]["per_seed"][seeds[0]]["co_llm"]["val"]["recommended_eta"]
        etas = {"eta 1 (never defers)": 1.0, f"eta {recommended} (validation)": recommended}
        prompts = [t.prompt for t in splits["test"]]
        figures["speed"] = speed_section(model, small, large, prompts, etas, MIDDLE_ENTROPY, args)
        figures["models"] = model_info(paths)
    figures["seconds"] = time.perf_counter() - started

    co = figures["co_llm"]
    print(f"\nCo-LLM ({len(seeds)} seeds, mean ± std; test: {len(splits['test'])} tasks)\n")
    print(co["system_table"] + "\n\n" + co["eta_table"] + "\n\n" + co["family_table"])
    print("\nhybrid gating (world-small + world-large, untrained)\n\n" + figures["hybrid"]["table"])
    col = figures["collab"]
    print(
        f"\nCollab on {col['tasks']} test tasks (k {args.k}, rollout_len {args.rollout_len}; "
        f"target RM held-out pairwise accuracy {col['reward_model']['eval_pairwise_accuracy']:.3f})"
        "\n\n" + col["table"]
    )
    for name, a in col["alone"].items():
        share = a["rm_prefers_correct_over_own_wrong"]
        print(
            f"target RM scores the correct answer above {name}'s wrong greedy answer: {share:.3f}"
        )
    print("\nspeed (Co-LLM model of the first seed)\n\n" + figures["speed"]["table"])
    print(f"\n{figures['seconds']:.0f} s in all")
    write_results("decoders", args, seeds, figures, args.device)


if __name__ == "__main__":
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0-4 (quick: 0 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the models run")
    parser.add_argument("--test-tasks", type=int, default=600, help="held_out_tasks(n)")
    parser.add_argument("--train-tasks", type=int, default=3000)
    parser.add_argument("--val-tasks", type=int, default=400)
    parser.add_argument("--init-steps", type=int, default=200, help="Co-LLM head-only steps")
    parser.add_argument("--steps", type=int, default=300, help="Co-LLM / NLL fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=1e-4, help="Co-LLM marginal / NLL lr")
    parser.add_argument("--rm-pairs", type=int, default=3000, help="target reward model pairs")
    parser.add_argument("--collab-tasks", type=int, default=300, help="test tasks for Collab")
    parser.add_argument("--collab-batch", type=int, default=128, help="backend batch size")
    parser.add_argument("--k", type=int, default=3, help="Collab: tokens proposed per agent")
    parser.add_argument("--rollout-len", type=int, default=10, help="Collab: Q rollout tokens")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument(
        "--speed-new-tokens", type=int, help="default: max_new (10); with --arch 64"
    )
    parser.add_argument("--speed-prompts", type=int, default=256, help="with --arch")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="speed only, random weights")
    parser.add_argument(
        "--arch-scale", type=int, default=1, help="divide --arch's widths and depth (smoke test)"
    )
    args = parser.parse_args()
    from flywheel.world.tasks import MAX_LEN

    args.max_new = MAX_LEN + 2  # what the world's evaluation uses
    args.speed_new_tokens = args.speed_new_tokens or (64 if args.arch else args.max_new)
    if args.quick:
        args.collab_tasks = min(args.collab_tasks, 120)
        args.speed_repeats = min(args.speed_repeats, 3)
    main(args)
