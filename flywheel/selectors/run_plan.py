"""A selectors run's plan, fixed before anything trains: fresh training, or an adapter
added to or removed from the latest selector; the tasks to train adapters for; and the
exact versions the run reads (the tasks dataset, the selector and library an update
starts from, the reward model that scores). Every later step, and the lineage of what
the run writes, uses these versions: none is looked up as "latest" again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flywheel.selectors.evaluation import SCORERS, Scorer, check_scorer, reward_model, reward_scorer
from flywheel.selectors.selector_versions import update_plan
from flywheel.selectors.tasks import TaskSource
from flywheel.store import DatasetRef, ModelRef


@dataclass(frozen=True)
class SelectorPlan:
    """What a run does and the versions it reads (see the module's docstring)."""

    mode: str  # "train", "add" or "remove"
    tasks: list[str]  # the task values adapters are trained for (add: the added one)
    dataset: DatasetRef | None  # the tasks dataset read; None: the source writes it later
    selector: ModelRef | None = None  # add/remove: the selector version updated
    library: ModelRef | None = None  # add/remove: that selector's library version
    names: dict[str, list[str]] = field(default_factory=dict)  # add/remove: {kind: adapters}
    scorer_model: ModelRef | None = None  # scorer 'reward_model': the version that scores


def plan_run(
    source: TaskSource,
    *,
    tasks: Sequence[str] | None,
    add: str | None,
    remove: str | None,
    need: int,
    scorer: str,
    scorer_reward_model: str | None,
    models: tuple[str, str, str],
) -> SelectorPlan:
    """The plan, or an error naming the field and the fix: the tasks `source` has for
    the run (`need`: k * per_centre rows each), the scorer, and for add/remove the latest
    selector (`models`: the selector's and library's model names and the source name a
    null tasks_dataset stands for, as `update_plan` takes them)."""
    dataset, chosen = source.choose(tasks, add, remove, need)
    check_scorer(scorer, scorer_reward_model)
    scorer_model = None if scorer_reward_model is None else reward_model(scorer_reward_model)
    update = update_plan(add, remove, source.name, *models)
    return SelectorPlan(
        **{"mode": "train", "dataset": dataset, "tasks": chosen, **update},
        scorer_model=scorer_model,
    )


def plan_scorer(plan: SelectorPlan, scorer: str, own_exact: Scorer | None) -> Scorer:
    """The run's scorer: the planned reward model's score, the source's own exact match
    where it has one (the world: its checker), or the built-in scorer of that name."""
    if plan.scorer_model is not None:
        return reward_scorer(plan.scorer_model)
    if scorer == "exact_match" and own_exact is not None:
        return own_exact
    return SCORERS[scorer]


__all__ = ["SelectorPlan", "plan_run", "plan_scorer"]
