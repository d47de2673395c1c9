"""The parameters of `reward/relabel` (`flywheel.flows.relabel`): UGDA's knobs, the
policy and how it samples, the labeler, and the datasets a round reads and writes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from flywheel.flows.pair_training import config_from, default_backbone
from flywheel.llm import BackendSpec
from flywheel.reward_models.ugda import UgdaConfig
from flywheel.store import data_root, validate_name
from flywheel.store.models import validate_model_name
from flywheel.store.naming import validate_output_name
from flywheel.world.tasks import MAX_LEN

DEFAULT_ENSEMBLE = "world-preference-pairs-ensemble3"


def _policy_spec() -> BackendSpec:
    return BackendSpec(model=default_backbone())


WORLD_RESPONSE_TOKENS = MAX_LEN + 2  # a world answer and its end
TEXT_RESPONSE_TOKENS = 256


class RelabelParams(UgdaConfig):
    """Parameters of `reward/relabel`: UGDA's knobs, the policy, the labeler."""

    model_config = ConfigDict(extra="forbid")

    ensemble: str = Field(
        DEFAULT_ENSEMBLE,
        description="registered reward ensemble; the default is trained first when missing",
    )
    policy: BackendSpec = Field(default_factory=_policy_spec, description="the current policy")
    prompts_dataset: str | None = Field(
        None, description="store dataset with a `prompt` column; null: world tasks"
    )
    n_prompts: int = Field(600, ge=2, description="world prompts to sample (2 responses each)")
    validation_dataset: str | None = Field(
        None,
        description="labelled prompt/chosen/rejected pairs on the policy's distribution; "
        "null: world oracle labels of a separate set of policy pairs",
    )
    n_validation_prompts: int = Field(200, ge=2)
    temperature: float = Field(1.0, gt=0, description="policy sampling temperature")
    policy_max_new_tokens: int | None = Field(
        None,
        ge=1,
        description=f"tokens per policy response; null: {WORLD_RESPONSE_TOKENS} for world "
        f"tasks, {TEXT_RESPONSE_TOKENS} for prompts_dataset",
    )
    policy_stop: list[str] | None = Field(
        None,
        description="stop strings of policy responses; null: a newline for world tasks, "
        "none for prompts_dataset",
    )
    judge_max_new_tokens: int = Field(
        16, ge=1, description="tokens of the judge's answer (labeler 'llm'; it names A or B)"
    )
    labeler: Literal["world", "llm", "human"] = "world"
    judge: BackendSpec | None = Field(None, description="the LLM judge (labeler 'llm')")
    queue: str = Field("relabel_queue", description="dataset people label (labeler 'human')")
    candidates_dataset: str = Field(
        "relabel_candidates", description="output: the scored policy pairs, selected flagged"
    )
    labeled_dataset: str = Field(
        "relabel_labeled", description="output: the labeled pairs (and <name>__failed)"
    )
    labels_file: str | None = Field(
        None,
        description="the labeled file for the latest queue (csv, jsonl or parquet); null: "
        "data/_labels/<queue>.csv",
    )
    budget: int = Field(64, ge=1, description="pairs sent to the labeler")

    @model_validator(mode="after")
    def _judge(self) -> RelabelParams:
        if self.labeler == "llm" and self.judge is None:
            raise ValueError("judge: required when labeler is 'llm' (a BackendSpec)")
        return self

    @field_validator("prompts_dataset", "validation_dataset", "queue")
    @classmethod
    def _dataset_name(cls, name: str | None) -> str | None:
        return None if name is None else validate_name(name)

    @field_validator("candidates_dataset", "labeled_dataset")
    @classmethod
    def _output_name(cls, name: str, info: ValidationInfo) -> str:
        # the labeled pairs come with <name>__failed
        failed = info.field_name == "labeled_dataset"
        return validate_output_name(name, field=info.field_name, failed=failed)

    @field_validator("ensemble")
    @classmethod
    def _ensemble_name(cls, name: str) -> str:
        # refined versions are saved under this name
        return validate_model_name(name, field="ensemble")

    def ugda(self) -> UgdaConfig:
        return config_from(UgdaConfig, self)

    def labels_path(self) -> Path:
        if self.labels_file:
            return Path(self.labels_file).expanduser()
        return data_root() / "_labels" / f"{self.queue}.csv"

    def sampling(self) -> dict:
        """How the policy samples (`policy_pairs` keywords): world tasks have one-line
        answers of a few tokens; the user's prompts get room for text."""
        world = self.prompts_dataset is None
        tokens = self.policy_max_new_tokens
        stop = self.policy_stop
        return {
            "temperature": self.temperature,
            "seed": self.seed,
            "max_new_tokens": tokens or (WORLD_RESPONSE_TOKENS if world else TEXT_RESPONSE_TOKENS),
            "stop": stop if stop is not None else (["\n"] if world else []),
        }
