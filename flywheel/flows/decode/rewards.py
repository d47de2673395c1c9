"""Registered reward models bound to the decoders: Collab's target reward (a reward
model's score, or the world's checker against the answers) and the scorer Co-LLM's eta
sweep ranks the validation outputs with."""

from __future__ import annotations

from typing import Literal

from flywheel.decoders.co_llm import SCORERS, Scorer
from flywheel.reward_models.bradley_terry import RewardModel
from flywheel.reward_models.ensemble import EnsembleRewardModel
from flywheel.store import ModelRef, read_model

# the sweep's scorers: the built-in ones (SCORERS) and a registered reward model's score
ScorerName = Literal["exact_match", "rouge_l", "reward_model"]


def read_reward_model(name: str, version: str | None, field: str) -> ModelRef:
    reward = read_model(name, version)
    if reward.meta["kind"] not in ("bradley-terry", "ensemble"):
        raise ValueError(
            f"{field}: {reward.name}@{reward.version} is a {reward.meta['kind']!r} "
            "model, not a reward model; train one with reward/train"
        )
    return reward


class TargetReward:
    """The target reward: a registered reward model's score, or the world's checker.

    Prompts arrive as the decoders read them (rendered); the reward model gets each
    prompt as the dataset gave it (text or chat messages) and renders it itself, as it
    was trained. What it cuts for length is counted in `length`."""

    def __init__(self, reward: ModelRef | None, rows: list[dict]) -> None:
        self.source = {r["prompt"]: r.get("source", r["prompt"]) for r in rows}
        self.answers = {r["prompt"]: r["answer"] for r in rows}
        self.model: RewardModel | EnsembleRewardModel | None = None
        if reward is not None:
            is_ensemble = reward.meta["kind"] == "ensemble"
            self.model = (EnsembleRewardModel if is_ensemble else RewardModel)(reward.path)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if self.model is None:
            return [
                float(c.strip() == self.answers[p].strip())
                for p, c in zip(prompts, completions, strict=True)
            ]
        given = [self.source.get(p, p) if isinstance(p, str) else p for p in prompts]
        scores = self.model.score(given, completions)
        return scores["mean"] if isinstance(scores, dict) else scores

    def length(self) -> dict:
        """{"reward model": LengthReport dict} of this run's scoring; empty for the world."""
        report = getattr(self.model, "length", None)
        return {} if report is None else {"reward model (scored in this run)": report.as_dict()}


def sweep_scorer(name: ScorerName, reward_model: str | None) -> Scorer:
    """The eta sweep's scorer: a built-in one, or the registered `reward_model`'s score."""
    if name != "reward_model":
        return SCORERS[name]
    reward = read_reward_model(reward_model, None, "sweep_reward_model")  # type: ignore[arg-type]
    score = TargetReward(reward, [])

    def by_reward(prompts, completions, answers) -> list[float]:
        return list(score(list(prompts), list(completions)))

    return by_reward
