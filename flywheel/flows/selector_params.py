"""The parameters of `selectors/kmeans` and what they stand for in the method: the task
source (a store dataset's columns, or the world's families), the adapters' LoRA
training and the selector's config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.flows.pair_training import default_backbone
from flywheel.selectors import LoraTraining, SelectorConfig
from flywheel.selectors.tasks import DatasetTasks, TasksLayout, TaskSource
from flywheel.world.selector_tasks import WorldTasks


class KmeansSelectorParams(BaseModel):
    """Parameters of `selectors/kmeans`."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default_factory=default_backbone, description="base model folder")
    tasks_dataset: str | None = Field(
        None,
        description="store dataset of (prompt, answer, task) rows: one adapter per task value; "
        "null: the world's task families",
    )
    tasks_dataset_version: str | None = Field(None, description="null: the latest version")
    prompt_column: str = Field("prompt", description="tasks_dataset's prompt column")
    answer_column: str = Field("answer", description="tasks_dataset's reference answer column")
    task_column: str = Field("task", description="tasks_dataset's column naming each row's task")
    tasks: list[str] | None = Field(
        None, description="the task values to train adapters for (world: family names); null: all"
    )
    families: list[str] | None = Field(
        None, description="world task families (the world's `tasks`); null: all"
    )
    samples_per_task: int = Field(1000, ge=1, description="world task data per family")
    eval_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of each task's rows held out for evaluation "
        "(tasks_dataset; the world evaluates on eval_tasks fresh held-out tasks)",
    )
    k: int = Field(4, ge=1, description="k-means centres per task")
    per_centre: int = Field(2, ge=1, description="selector samples nearest each centre")
    distance: Literal["euclidean", "cosine"] = "euclidean"
    selector: Literal["lora", "head", "both"] = "both"
    adapter_rank: int = Field(8, ge=1)
    adapter_steps: int = Field(300, ge=1)
    adapter_lr: float = Field(1e-2, gt=0)
    target_modules: list[str] | None = Field(
        None,
        description="LoRA target module names (adapters and the LoRA selector); null: found "
        "for the architecture (q/k/v/o and MLP projections, GPT-2's c_attn/c_proj/c_fc)",
    )
    selector_rank: int = Field(4, ge=1)
    selector_steps: int = Field(150, ge=1, description="LoRA selector steps (head: epochs 300)")
    old_share: float = Field(0.3, ge=0, le=1, description="old samples replayed on add")
    eval_tasks: int = Field(600, ge=1, description="held-out world tasks (all families)")
    scorer: Literal["exact_match", "rouge_l", "reward_model"] = Field(
        "exact_match",
        description="how outputs are scored against the answer: exact match (the world: its "
        "checker), ROUGE-L F1, or a registered reward model's score (scorer_reward_model)",
    )
    scorer_reward_model: str | None = Field(
        None, description="registered reward model (scorer 'reward_model')"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="generation length; null: the longest answer's tokens + 2"
    )
    multitask_baseline: bool = Field(
        True, description="train one adapter on all tasks' data with the same total steps"
    )
    seed: int = 0
    add: str | None = Field(
        None, description="a task value (world: family) to add to the latest selector"
    )
    remove: str | None = Field(None, description="an adapter to remove from the latest selector")

    def task_source(self) -> TaskSource:
        """The tasks: the dataset's, or the world's families (recorded as `world`)."""
        if self.tasks_dataset is None:
            return WorldTasks(self.families, self.samples_per_task, self.eval_tasks, self.seed)
        columns = (self.prompt_column, self.answer_column, self.task_column)
        layout = TasksLayout(*columns, eval_fraction=self.eval_fraction, seed=self.seed)
        return DatasetTasks(self.tasks_dataset, self.tasks_dataset_version, layout)

    def adapter_training(self, steps: int | None = None) -> LoraTraining:
        return LoraTraining(
            rank=self.adapter_rank,
            steps=steps or self.adapter_steps,
            lr=self.adapter_lr,
            seed=self.seed,
            target_modules=self.target_modules,
        )

    def selector_config(self) -> SelectorConfig:
        same = self.model_dump(include={"k", "per_centre", "distance", "old_share", "seed"})
        rank, steps, modules = self.selector_rank, self.selector_steps, self.target_modules
        return SelectorConfig(**same, rank=rank, steps=steps, target_modules=modules)
