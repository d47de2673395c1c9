"""`decode/co-llm`: train the base + deferral head pair (or reuse it), choose eta on
validation with a scorer, decode the prompts; the method is `flywheel.decoders.co_llm`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pyarrow as pa
from prefect import task
from pydantic import Field, field_validator, model_validator

from flywheel.decoders import co_llm as co_llm_module
from flywheel.decoders import stepping
from flywheel.decoders.co_llm import (
    CoLLM,
    CoLLMTraining,
    co_llm_decode,
    sweep_eta,
    train_co_llm,
)
from flywheel.decoders.stepping import (
    CausalLM,
)
from flywheel.flows.decode.common import (
    ETA_SWEEP,
    WORLD_EXAMPLES,
    WORLD_PROMPTS,
    WORLD_VALIDATION,
    DecodeParams,
    TargetReward,
    accuracy,
    alone_figures,
    check_fits,
    code_hash,
    common_fields,
    decode_rows,
    examples_dataset,
    figure,
    large_model,
    output_rows,
    prompt_rows,
    read_reward_model,
    same_tokenizer,
    share,
    token_rows,
    work_key,
    write_output,
)
from flywheel.flows.reward import default_backbone
from flywheel.flows.tracking import (
    MODEL_CALLS,
    Deployment,
    earlier_model,
    length_figures,
    model_inputs,
    training_key,
    write_once,
)
from flywheel.llm import Backend, BackendSpec, make_backend, model_fingerprint
from flywheel.store import (
    DatasetRef,
    ModelRef,
    data_root,
    read_model,
    save_model_version,
    validate_name,
)
from flywheel.store.datasets import new_version, validate_derived_version
from flywheel.store.models import validate_model_name

log = logging.getLogger(__name__)


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
    sweep_scorer: Literal["exact_match", "rouge_l", "reward_model"] = Field(
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


# --- decode/co-llm ---

CO_LLM_SOURCE = code_hash(co_llm_module, stepping)
CO_LLM_SCHEMA = pa.schema(
    [*common_fields(), ("token_ids", pa.list_(pa.int64())), ("deferral_share", pa.float64())]
)


@task(name="check-inputs")
def check_co_llm_inputs(params: CoLLMParams) -> dict:
    """Before any weights load: folders, one vocabulary, eta, the three datasets."""
    same_tokenizer("base_model", params.base_model, "assistant_model", params.assistant_model)
    if params.eta is not None:
        co_llm_module.check_eta(params.eta)
    if params.assistant_backend is not None:
        params.assistant_backend.check()
    prompts, rows = prompt_rows(params, params.base_model)
    check_fits(
        rows,
        params.max_new_tokens,
        {"base_model": params.base_model, "assistant_model": params.assistant_model},
    )
    if params.sweep_reward_model is not None:
        read_reward_model(params.sweep_reward_model, None, "sweep_reward_model")
    held_out = {r["prompt"] for r in rows}
    examples = examples_dataset(
        params.train_dataset,
        "train_dataset",
        WORLD_EXAMPLES,
        params.world_examples,
        params.seed,
        held_out,
    )
    validation = examples_dataset(
        params.validation_dataset,
        "validation_dataset",
        WORLD_VALIDATION,
        params.world_validation,
        params.seed + 1,
        held_out,
    )
    return {"prompts": prompts, "rows": rows, "examples": examples, "validation": validation}


def _pairs(ref: DatasetRef) -> list[tuple[str, str]]:
    table = ref.to_pandas()
    return list(zip(table["prompt"], table["answer"], strict=True))


@task(name="train-co-llm")
def train_pair(params: CoLLMParams, data: dict, run_id: str) -> ModelRef:
    """Train the deferral head and the base; the same examples, settings, code and
    weights reuse the published version. The assistant's target log-probs are stored
    under `_work/co-llm-targets`, keyed by its weights, and survive a killed run."""
    assistant_fp = model_fingerprint(BackendSpec(model=params.assistant_model))
    sources = CO_LLM_SOURCE + assistant_fp  # retrained assistant weights retrain the pair
    key = training_key(params.training(), [data["examples"]], sources, params.base_model)
    if earlier := earlier_model(params.model_name, key):
        return earlier
    targets = data_root() / "_work" / "co-llm-targets" / f"{assistant_fp}.pt"

    def build(folder: Path) -> dict:
        model, stats = train_co_llm(
            CausalLM.load(params.base_model),
            CausalLM.load(params.assistant_model),
            _pairs(data["examples"]),
            targets_path=targets,
            **params.train_kwargs(),
        )
        model.save(folder)
        return json.loads(json.dumps({**stats, "cache_key": key}, default=str))

    inputs = [
        data["examples"],
        *model_inputs(BackendSpec(model=params.base_model)),
        *model_inputs(BackendSpec(model=params.assistant_model)),
    ]
    return save_model_version(
        params.model_name, build, kind="co-llm", produced_by=run_id, inputs=inputs
    )


@contextlib.contextmanager
def _assistant(params: CoLLMParams) -> Iterator[CausalLM | Backend]:
    """The assistant for decoding: in process, or behind the given backend (closed after)."""
    if params.assistant_backend is None:
        yield CausalLM.load(params.assistant_model)
        return
    with make_backend(params.assistant_backend) as backend:
        yield backend


@task(name="choose-eta", **MODEL_CALLS)
def choose_eta(params: CoLLMParams, model: ModelRef, data: dict, run_id: str) -> dict:
    """The given eta, or the sweep's best on the validation set (written to the store)."""
    if params.eta is not None:
        return {"eta": params.eta, "sweep": None}
    pairs = _pairs(data["validation"])
    prompts = [p for p, _ in pairs]
    pair = CoLLM.load(model.path)
    with _assistant(params) as assistant:
        report = sweep_eta(
            pair,
            assistant,
            prompts,
            [a for _, a in pairs],
            scorer=_sweep_scorer(params),
            etas=params.etas,
            max_new_tokens=params.max_new_tokens,
            batch_size=params.batch_size,
        )
    rows = [
        {
            "model": f"{model.name}@{model.version}",
            **r,
            "recommended": r["eta"] == report["recommended_eta"],
        }
        for r in report["results"]
    ]
    # one sweep per model version and sweep setting: a re-run reuses it
    setting = params.model_dump_json(
        include={
            "etas",
            "max_new_tokens",
            "validation_dataset",
            "sweep_scorer",
            "sweep_reward_model",
        }
    )
    version = f"{model.name}_{model.version}_{hashlib.sha256(setting.encode()).hexdigest()[:8]}"
    sweep, _ = write_once(
        ETA_SWEEP, rows, version.replace("-", "_"), run_id, [model, data["validation"]]
    )
    return {"eta": report["recommended_eta"], "sweep": sweep, "results": report["results"]}


def _sweep_scorer(params: CoLLMParams) -> co_llm_module.Scorer:
    """The eta sweep's scorer: a built-in one, or a registered reward model's score."""
    if params.sweep_scorer != "reward_model":
        return co_llm_module.SCORERS[params.sweep_scorer]
    reward = read_model(params.sweep_reward_model)  # type: ignore[arg-type]
    score = TargetReward(reward, [])

    def by_reward(prompts, completions, answers) -> list[float]:
        return list(score(list(prompts), list(completions)))

    return by_reward


@task(name="decode-co-llm", **MODEL_CALLS)
def decode_co_llm(
    params: CoLLMParams, model: ModelRef, data: dict, eta: float, run_id: str
) -> tuple[DatasetRef, bool]:
    pair = CoLLM.load(model.path)
    spec = params.assistant_backend or BackendSpec(model=params.assistant_model)
    key = [
        f"{model.name}@{model.version}",
        eta,
        model_fingerprint(spec),
        CO_LLM_SOURCE,
        work_key(params, data),
    ]
    with _assistant(params) as assistant:

        def decode_chunk(chunk: list[dict]) -> list[dict]:
            out = co_llm_decode(
                pair,
                assistant,
                # the prompts as given: the pair renders them as it was trained to
                [r["source"] for r in chunk],
                eta=eta,
                max_new_tokens=params.max_new_tokens,
                batch_size=params.batch_size,
            )
            return token_rows(chunk, out, "deferral_share", "assistant")

        rows, ckpt = decode_rows("co-llm", key, data["rows"], decode_chunk, params.batch_size)
    inputs = [data["prompts"], model, *model_inputs(spec)]
    return write_output(params, ckpt, rows, CO_LLM_SCHEMA, run_id, inputs)


CO_LLM_FLOW_DEFAULTS = CoLLMParams()
CO_LLM = Deployment("decode/co-llm", "Co-LLM decoding", nightly_utc="0 6 * * *")


@CO_LLM.flow
def co_llm_flow(params: CoLLMParams = CO_LLM_FLOW_DEFAULTS) -> dict:
    """Co-LLM: a base model that defers tokens to an assistant, eta chosen on validation."""
    with CO_LLM.run(params) as run:
        data = check_co_llm_inputs(params)
        model = train_pair(params, data, run.id)
        chosen = choose_eta(params, model, data, run.id)
        output, reused = decode_co_llm(params, model, data, chosen["eta"], run.id)
        rows = output_rows(output)
        figures = {
            "model": f"{model.name}@{model.version}",
            "reused earlier model": model.meta["produced_by"] != run.id,
            "output": f"{output.name}@{output.version}",
            "reused earlier output": reused,
            "prompts": len(rows),
            "eta": chosen["eta"],
            "eta chosen by": "the validation sweep" if params.eta is None else "the eta parameter",
            "accuracy": figure(accuracy(rows, [r["completion"] for r in rows])),
            "share of tokens deferred": share(rows, "assistant"),
            **length_figures({"train": model.meta["metrics"].get("length", {})}),
        }
        if params.baselines:
            alone = {"base alone": params.base_model, "assistant alone": params.assistant_model}
            figures |= alone_figures(data["rows"], alone, params)
        extra = ""
        if chosen["sweep"] is not None:
            lines = [f"| eta | {params.sweep_scorer} | share deferred |", "|---|---|---|"]
            for r in chosen["results"]:
                mark = " (chosen)" if r["eta"] == chosen["eta"] else ""
                lines.append(
                    f"| {r['eta']:g}{mark} | {r['score']:.3f} | {r['deferral_share']:.3f} |"
                )
            validation = data["validation"]
            extra = (
                f"## eta sweep on {validation.name}@{validation.version}\n\n"
                + "\n".join(lines)
                + f"\n\nRows: dataset {chosen['sweep'].name}@{chosen['sweep'].version}."
            )
        run.summary(figures, extra)
        return {"figures": figures, "sweep": chosen.get("results")}
