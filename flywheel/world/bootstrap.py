"""Train the world's tiny models (small and large) and report their accuracy per family."""

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
    """Train and save `world-small` and `world-large` under root; return the report.

    A size whose folder already holds a report made with the same config is
    kept, so a re-run is instant.
    """
    config = config or BootstrapConfig()
    root = Path(root)
    tasks = held_out_tasks(config.eval_tasks)
    report: dict = {"config": config.model_dump(), "models": {}}
    for size, budget in (("small", config.small_budget_s), ("large", config.large_budget_s)):
        path = model_dir(root, size)
        report_file = path / "bootstrap_report.json"
        if report_file.exists():
            previous = json.loads(report_file.read_text())
            if previous.get("config") == config.model_dump():
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
        # write to a temporary folder and rename: a killed bootstrap leaves no half model
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
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)
        report["models"][size] = entry
    return report


def format_report(report: dict) -> str:
    """A markdown table of accuracy per family for each model."""
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
    return "\n".join(lines)
