"""The parameters of `decode/co-llm` (`flywheel.flows.decode.co_llm`): how the pair
trains, the models, the example datasets and the eta sweep, checked together."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from pydantic import Field, field_validator, model_validator

from flywheel.decoders import co_llm as co_llm_module
from flywheel.decoders.co_llm import CoLLMTraining
from flywheel.decoders.stepping import CausalLM
from flywheel.flows.decode.common import (
    WORLD_EXAMPLES,
    WORLD_PROMPTS,
    WORLD_VALIDATION,
    DecodeParams,
    large_model,
)
from flywheel.flows.decode.rewards import ScorerName
from flywheel.flows.pair_training import default_backbone
from flywheel.llm import Backend, BackendSpec, make_backend
from flywheel.store import ModelRef, validate_name
from flywheel.store.models import validate_model_name
from flywheel.store.naming import new_version, validate_derived_version


class CoLLMParams(DecodeParams, CoLLMTraining):
    """Parameters of `decode/co-llm`: how the pair trains (`CoLLMTraining`), the decoders'
    common ones, the models, the data and the eta sweep."""

    base_model: str = Field(default_factory=default_backbone, description="base model folder")
    assistant_model: str = Field(
        default_factory=large_model, description="assistant folder: training, and decoding"
    )
    assistant_backend: BackendSpec | None = Field(
        None,
        description="decode through this backend instead (e.g. an OpenAI-compatible server "
        "serving assistant_model); it must use the base model's tokenizer",
    )
    model_name: str = Field("co-llm", description="registered name of the trained pair")
    train_dataset: str | None = Field(
        None, description=f"prompt/answer examples; null: {WORLD_EXAMPLES!r} from the world"
    )
    validation_dataset: str | None = Field(
        None, description=f"prompt/answer rows for the eta sweep; null: {WORLD_VALIDATION!r}"
    )
    world_examples: int = Field(4000, ge=1)
    world_validation: int = Field(300, ge=1)
    eta: float | None = Field(
        None, ge=0, le=1, description="defer when P(defer) > eta; null: the sweep's best"
    )
    etas: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(11)],
        min_length=1,
        description="etas swept on the validation set",
    )
    sweep_scorer: ScorerName = Field(
        "exact_match",
        description="how the sweep scores a validation answer: exact match, ROUGE-L F against "
        "the answer (free text), or a registered reward model (sweep_reward_model)",
    )
    sweep_reward_model: str | None = Field(
        None, description="registered reward model (sweep_scorer 'reward_model')"
    )

    @field_validator("etas")
    @classmethod
    def _etas(cls, etas: list[float]) -> list[float]:
        for eta in etas:
            co_llm_module.check_eta(eta)
        return etas

    @field_validator("train_dataset", "validation_dataset")
    @classmethod
    def _optional_name(cls, name: str | None) -> str | None:
        return None if name is None else validate_name(name)

    @model_validator(mode="after")
    def _names(self) -> CoLLMParams:
        validate_model_name(self.model_name, field="model_name")
        # the eta sweep is written as version <model_name>_<model version>_<8 hex digits>
        sweep = f"{self.model_name}_{new_version()}_{'0' * 8}".replace("-", "_")
        validate_derived_version(sweep, field="model_name", value=self.model_name)
        self.output = self.output or "decoded_co_llm"
        if (self.sweep_scorer == "reward_model") != (self.sweep_reward_model is not None):
            raise ValueError(
                "sweep_reward_model: give it exactly when sweep_scorer is 'reward_model' "
                f"(sweep_scorer is {self.sweep_scorer!r})"
            )
        if self.prompts != WORLD_PROMPTS:
            # the world's examples teach nothing about the user's prompts: no quiet fallback
            if self.train_dataset is None:
                raise ValueError(
                    f"train_dataset: required when prompts is your own dataset "
                    f"({self.prompts!r}): prompt/answer examples like your prompts, to train "
                    f"the deferral head on ({WORLD_EXAMPLES!r} holds world tasks only)"
                )
            if self.validation_dataset is None and self.eta is None:
                raise ValueError(
                    f"validation_dataset: required when prompts is your own dataset "
                    f"({self.prompts!r}) and no eta is given: prompt/answer rows to sweep eta "
                    "on; or set eta to skip the sweep"
                )
        return self

    def training(self) -> str:
        """The fields the trained pair depends on (not eta, prompts or output)."""
        return self.model_dump_json(
            include={"base_model", "assistant_model", *CoLLMTraining.model_fields}
        )

    def sweep_version(self, model: ModelRef) -> str:
        """The eta sweep's dataset version (the form `_names` leaves room for): one per
        model version and sweep setting, so a re-run reuses it."""
        setting = self.model_dump_json(
            include={
                "etas",
                "max_new_tokens",
                "validation_dataset",
                "sweep_scorer",
                "sweep_reward_model",
            }
        )
        digest = hashlib.sha256(setting.encode()).hexdigest()[:8]
        return f"{model.name}_{model.version}_{digest}".replace("-", "_")

    @contextlib.contextmanager
    def assistant(self) -> Iterator[CausalLM | Backend]:
        """The assistant for decoding: in process, or behind `assistant_backend` (closed
        after)."""
        if self.assistant_backend is None:
            yield CausalLM.load(self.assistant_model)
            return
        with make_backend(self.assistant_backend) as backend:
            yield backend
