"""Train the world's tiny models (small, large and the shop agent) and report their figures."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from pydantic import BaseModel

from flywheel.world.models import ModelSize, char_tokenizer, new_tiny_model, save_tiny
from flywheel.world.tasks import (
    FAMILIES,
    MAX_LEN,
    MIN_LEN,
    Task,
    make_task,
    one_shot_prompt,
    sample_tasks,
)
from flywheel.world.training import accuracy_by_family, train_causal_lm

log = logging.getLogger(__name__)

EVAL_SEED = 10_000  # held-out tasks are drawn from a seed the training sampler never uses
HARD_MIN_LEN = 6


class BootstrapConfig(BaseModel):
    # steps make the models reproducible; the time budgets only cap a slow or busy machine
    small_steps: int = 2400
    large_steps: int = 2400
    small_budget_s: float = 45.0
    large_budget_s: float = 125.0
    small_lr: float = 3e-3
    large_lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    eval_tasks: int = 600
    # the shop agent (flywheel.world.shop_agent), for ARMAP
    shop_agent_steps: int = 2500
    shop_agent_budget_s: float = 40.0
    shop_agent_eval_intents: int = 100


SHOP_AGENT = "shop-agent"


def _own_config(config: dict, model: str) -> dict:
    """The fields that define one model: changing the agent's budget keeps the world models."""
    if model == SHOP_AGENT:
        return {k: v for k, v in config.items() if k.startswith("shop_agent_") or k == "seed"}
    return {k: v for k, v in config.items() if not k.startswith("shop_agent_")}


def _cached(path: Path, config: BootstrapConfig, model: str) -> dict | None:
    report_file = path / "bootstrap_report.json"
    if not report_file.exists():
        return None
    previous = json.loads(report_file.read_text())
    wanted = _own_config(config.model_dump(), model)
    return previous if _own_config(previous.get("config", {}), model) == wanted else None


def _move_into_place(tmp: Path, path: Path) -> None:
    # a temporary folder renamed into place: a killed bootstrap leaves no half model
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


def world_example(rng: random.Random) -> tuple[str, str]:
    """A fresh training pair; half are in the one-shot format that REFED prompts use."""
    task = make_task(rng.choice(list(FAMILIES)), rng.randint(MIN_LEN, MAX_LEN), rng)
    if rng.random() < 0.5:
        example = make_task(task.family, rng.randint(MIN_LEN, MAX_LEN), rng)
        return one_shot_prompt(example.instruction, example.answer, task.instruction), task.answer
    return task.prompt, task.answer


def held_out_tasks(n: int, seed: int = EVAL_SEED) -> list[Task]:
    return sample_tasks(n, random.Random(seed))


def evaluate_model(model_path: str | Path, tasks: list[Task]) -> dict:
    """Accuracy per family on all tasks and on the hard ones (length >= HARD_MIN_LEN)."""
    from flywheel.llm import TransformersBackend

    with TransformersBackend(model_path, batch_size=128) as backend:
        answers = backend.generate([t.prompt for t in tasks], max_new_tokens=MAX_LEN + 2)
    hard = [(t, a) for t, a in zip(tasks, answers, strict=True) if t.difficulty >= HARD_MIN_LEN]
    return {
        "accuracy": accuracy_by_family(tasks, answers),
        "accuracy_hard": accuracy_by_family([t for t, _ in hard], [a for _, a in hard]),
    }


def models_root() -> Path:
    """`<data>/_models`: a leading underscore keeps it out of the dataset namespace."""
    from flywheel.store import data_root

    return data_root() / "_models"


def model_dir(root: Path, size: ModelSize) -> Path:
    return root / f"world-{size}"


def bootstrap_models(root: str | Path, config: BootstrapConfig | None = None) -> dict:
    """Train and save `world-small`, `world-large` and `shop-agent` under root; return the report.

    A model whose folder already holds a report made with the same config (its
    own fields of it) is kept, so a re-run is instant. The shop agent's figures
    are under "shop_agent", apart from the world models' under "models".
    """
    config = config or BootstrapConfig()
    root = Path(root)
    tasks = held_out_tasks(config.eval_tasks)
    report: dict = {"config": config.model_dump(), "models": {}}
    for size, budget in (("small", config.small_budget_s), ("large", config.large_budget_s)):
        path = model_dir(root, size)
        if (previous := _cached(path, config, size)) is not None:
            log.info("world-%s already trained with this config: %s", size, path)
            report["models"][size] = previous
            continue
        steps = config.small_steps if size == "small" else config.large_steps
        log.info("training world-%s: %d steps, at most %.0fs", size, steps, budget)
        model = new_tiny_model(size, seed=config.seed)
        stats = train_causal_lm(
            model,
            char_tokenizer(),
            world_example,
            steps=steps,
            batch_size=config.batch_size,
            lr=config.small_lr if size == "small" else config.large_lr,
            seed=config.seed,
            time_budget_s=budget,
            progress=lambda step, loss, size=size: log.info(
                "world-%s step %d loss %.3f", size, step, loss
            ),
        )
        tmp = path.with_name(path.name + ".tmp")
        save_tiny(model, tmp)
        entry = {
            "config": config.model_dump(),
            "path": str(path),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train": stats,
            **evaluate_model(tmp, tasks),
        }
        (tmp / "bootstrap_report.json").write_text(json.dumps(entry, indent=2))
        _move_into_place(tmp, path)
        report["models"][size] = entry
    report["shop_agent"] = bootstrap_shop_agent(root, config)
    return report


def shop_agent_dir(root: Path) -> Path:
    return Path(root) / SHOP_AGENT


def bootstrap_shop_agent(root: str | Path, config: BootstrapConfig) -> dict:
    """Train `shop-agent` under root (kept when trained with the same config); its report."""
    from flywheel.world.shop_agent import train_shop_agent

    path = shop_agent_dir(Path(root))
    if (previous := _cached(path, config, SHOP_AGENT)) is not None:
        log.info("shop-agent already trained with this config: %s", path)
        return previous
    log.info(
        "training shop-agent: %d steps, at most %.0fs",
        config.shop_agent_steps,
        config.shop_agent_budget_s,
    )
    tmp = path.with_name(path.name + ".tmp")
    trained = train_shop_agent(
        tmp,
        config.shop_agent_budget_s,
        seed=config.seed,
        steps=config.shop_agent_steps,
        eval_intents=config.shop_agent_eval_intents,
    )
    entry = {"config": config.model_dump(), **trained, "path": str(path)}
    (tmp / "bootstrap_report.json").write_text(json.dumps(entry, indent=2))
    _move_into_place(tmp, path)
    return entry


def format_report(report: dict) -> str:
    """A markdown table of accuracy per family for each model; the shop agent's success."""
    families = sorted(FAMILIES) + ["all"]
    lines = [
        "| model | params | steps | train s | " + " | ".join(families) + " | hard (len>=6) |",
        "|---" * (len(families) + 5) + "|",
    ]
    for size, entry in report["models"].items():
        acc = entry["accuracy"]
        lines.append(
            f"| world-{size} | {entry['parameters']:,} | {entry['train']['steps']} | "
            f"{entry['train']['seconds']:.0f} | "
            + " | ".join(f"{acc.get(f, 0.0):.2f}" for f in families)
            + f" | {entry['accuracy_hard'].get('all', 0.0):.2f} |"
        )
    agent = report.get("shop_agent")
    if agent and "eval" in agent:
        ev = agent["eval"]
        lines += [
            "",
            f"| model | params | steps | train s | shop success on {ev['intents']} held-out "
            "intents: sampled (T=1) | greedy | the expert it imitates |",
            "|---|---|---|---|---|---|---|",
            f"| {SHOP_AGENT} | {agent['parameters']:,} | {agent['train']['steps']} | "
            f"{agent['train']['seconds']:.0f} | {ev['sampled']['success']:.2f} | "
            f"{ev['greedy']['success']:.2f} | {ev['expert']['success']:.2f} |",
        ]
    return "\n".join(lines)
