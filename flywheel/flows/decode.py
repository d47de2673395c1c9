"""`decode/co-llm`, `decode/collab`, `decode/hybrid`: the collaborative decoders over a
store dataset of prompts, their outputs written back with lineage. Wiring only; the
methods are in `flywheel.decoders`.

Each run reads its prompts (by default `world_decode_prompts`, held-out world tasks
with their answers), checks every input before a model loads, decodes chunk by chunk
under a checkpoint (a killed run resumes where it stopped and writes each row once),
and, when the prompts carry answers, reports exact-match accuracy next to the
models alone on the same prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pyarrow as pa
from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import AutoConfig, AutoTokenizer

from flywheel.decoders import co_llm as co_llm_module
from flywheel.decoders import collab as collab_module
from flywheel.decoders import hybrid as hybrid_module
from flywheel.decoders import stepping
from flywheel.decoders.co_llm import CoLLM, co_llm_decode, sweep_eta, train_co_llm
from flywheel.decoders.collab import CollabConfig, collab_decode
from flywheel.decoders.hybrid import check_threshold, hybrid_decode
from flywheel.decoders.stepping import (
    CausalLM,
    Decoded,
    check_same_vocab,
    decode_text,
    greedy_decode,
)
from flywheel.flows.reward import default_backbone
from flywheel.flows.tracking import (
    MODEL_CALLS,
    earlier_model,
    length_figures,
    model_inputs,
    reuse_or_write,
    summary_artifact,
    tracked_run,
    training_key,
    write_once,
)
from flywheel.llm import Backend, BackendSpec, make_backend, model_fingerprint
from flywheel.llm.base import call_each
from flywheel.llm.chat import (
    NotAText,
    PromptFormat,
    as_text_value,
    is_empty,
    render_prompt,
    resolve_format,
)
from flywheel.llm.tokens import position_limit
from flywheel.reward_models.bradley_terry import RewardModel
from flywheel.reward_models.ensemble import EnsembleRewardModel
from flywheel.store import (
    Checkpoint,
    DatasetRef,
    ModelRef,
    data_root,
    read_dataset,
    read_model,
    save_model_version,
    validate_name,
)
from flywheel.store.datasets import new_version, validate_derived_version
from flywheel.store.models import validate_model_name
from flywheel.world.bootstrap import EVAL_SEED, model_dir, models_root
from flywheel.world.tasks import MAX_LEN, sample_tasks

WORLD_PROMPTS = "world_decode_prompts"
WORLD_EXAMPLES = "world_co_llm_examples"
WORLD_VALIDATION = "world_co_llm_validation"
ETA_SWEEP = "co_llm_eta_sweep"
WORLD_REWARD = "world"  # the world's own checker as the target reward (1 right, 0 wrong)

log = logging.getLogger(__name__)


def _source(*modules) -> str:
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()


def _large_model() -> str:
    return str(model_dir(models_root(), "large"))


# --- parameters ---


class DecodeParams(BaseModel):
    """What every decoder flow reads and writes."""

    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(
        WORLD_PROMPTS,
        description=f"store dataset with a prompt column (optional id and answer columns); "
        f"{WORLD_PROMPTS!r} is generated from held-out world tasks when absent",
    )
    prompts_version: str | None = Field(None, description="null: the latest version")
    prompt_column: str = "prompt"
    answer_column: str | None = Field(
        "answer", description="reference answers for exact-match accuracy; null or absent: none"
    )
    prompt_format: PromptFormat = Field(
        "auto",
        description="'chat': prompts (text or chat messages) are rendered with the model's "
        "chat template, the assistant turn opened; 'raw': text as it is; 'auto': chat when "
        "the model has a chat template",
    )
    limit: int | None = Field(None, ge=1, description="decode only the first `limit` prompts")
    world_prompts: int = Field(300, ge=1, description=f"size of a generated {WORLD_PROMPTS}")
    max_new_tokens: int = Field(MAX_LEN + 2, ge=1)
    batch_size: int = Field(64, ge=1, description="prompts per batch and per checkpoint chunk")
    baselines: bool = Field(True, description="also decode with each model alone, for accuracy")
    output: str = Field("", description="dataset to write; empty: decoded_<method>")
    seed: int = 0

    @field_validator("prompts", "output")
    @classmethod
    def _dataset_name(cls, name: str) -> str:
        return validate_name(name) if name else name


def _folder_exists(field: str, path: str) -> None:
    if not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"{field}: no model folder at {path}; run `prefect deployment run world/bootstrap` "
            "for the world models, or pass a model folder"
        )


class CoLLMParams(DecodeParams):
    """Parameters of `decode/co-llm`."""

    base_model: str = Field(default_factory=default_backbone, description="base model folder")
    assistant_model: str = Field(
        default_factory=_large_model, description="assistant folder: training, and decoding"
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
    init_steps: int = Field(200, ge=0, description="weak-supervision steps of the head")
    steps: int = Field(300, ge=1, description="marginal-likelihood steps, base and head")
    train_batch_size: int = Field(32, ge=1)
    head_lr: float = Field(1e-2, gt=0)
    lr: float = Field(1e-4, gt=0, description="base and head, marginal likelihood")
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
    max_length: int | None = Field(
        None, ge=8, description="tokens per training example; null: the base model's context"
    )
    over_length: Literal["truncate", "drop"] = Field(
        "truncate", description="a longer training example: cut or leave out; counted"
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
            include={
                "base_model",
                "assistant_model",
                "init_steps",
                "steps",
                "train_batch_size",
                "head_lr",
                "lr",
                "seed",
                "prompt_format",
                "max_length",
                "over_length",
            }
        )


class HybridParams(DecodeParams):
    """Parameters of `decode/hybrid`."""

    small_model: str = Field(default_factory=default_backbone, description="writes by default")
    large_model: str = Field(default_factory=_large_model, description="takes uncertain tokens")
    measure: Literal["entropy", "max_prob"] = "entropy"
    threshold: float = Field(
        0.5,
        ge=0,
        description="entropy: send when above it (nats); max_prob: send when the top "
        "probability is below it (0..1)",
    )

    @model_validator(mode="after")
    def _check(self) -> HybridParams:
        check_threshold(self.measure, self.threshold)
        self.output = self.output or "decoded_hybrid"
        return self


def _world_agents() -> list[BackendSpec]:
    return [
        BackendSpec(model=default_backbone(), batch_size=64),
        BackendSpec(model=_large_model(), batch_size=64),
    ]


class CollabParams(DecodeParams):
    """Parameters of `decode/collab`."""

    agents: list[BackendSpec] = Field(
        default_factory=_world_agents, min_length=1, description="the agent policies"
    )
    reward_model: str = Field(
        "world-preference-pairs-rm",
        description=f"registered reward model (from reward/train) as the target reward; "
        f"{WORLD_REWARD!r}: the world's checker against the answer column",
    )
    reward_version: str | None = Field(None, description="null: the latest version")
    k: int = Field(3, ge=1, description="tokens each agent proposes per step")
    rollout_len: int = Field(MAX_LEN + 2, ge=0, description="greedy tokens to estimate Q")
    alpha: float = Field(0.1, ge=0, description="KL regularisation")
    eos_tokens: list[str] = Field(
        default_factory=list, description="extra token texts that end a text (HTTP agents)"
    )
    stop: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> CollabParams:
        self.output = self.output or "decoded_collab"
        return self

    def config(self) -> CollabConfig:
        return CollabConfig(
            k=self.k,
            rollout_len=self.rollout_len,
            alpha=self.alpha,
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            eos_tokens=self.eos_tokens,
        )


# --- inputs ---


def _world_rows(n: int, seed: int, avoid: set[str] = frozenset()) -> list[dict]:
    """World tasks as prompt/answer rows, leaving out the prompts in `avoid`."""
    return [
        {"id": t.id, "prompt": t.prompt, "answer": t.answer, "family": t.family}
        for t in sample_tasks(n, random.Random(seed))
        if t.prompt not in avoid
    ]


def _prompt_rows(
    params: DecodeParams, tokenizer_path: str | None = None
) -> tuple[DatasetRef, list[dict]]:
    """The prompts dataset and its rows as {id, prompt, answer}, checked. Each prompt
    (text or chat messages) is rendered as the model at `tokenizer_path` reads it; no
    tokenizer (HTTP agents only): text as it is, messages as `role: content` lines."""
    if params.prompts == WORLD_PROMPTS and params.prompts_version is None:
        ref = reuse_or_write(
            WORLD_PROMPTS,
            f"world:seed{EVAL_SEED}_n{params.world_prompts}",
            lambda: _world_rows(params.world_prompts, EVAL_SEED),
        )
    else:
        ref = read_dataset(params.prompts, params.prompts_version)
    source = f"dataset {ref.name}@{ref.version}"
    table = ref.to_arrow()
    if params.prompt_column not in table.column_names:
        raise ValueError(
            f"{source}: no prompt column {params.prompt_column!r} (field: prompt_column); "
            f"its columns are {table.column_names}"
        )
    if params.limit is not None:
        table = table.slice(0, params.limit)
    if table.num_rows == 0:
        raise ValueError(
            f"{source} has no prompts (0 rows; field: prompts): write prompts to it or "
            "name a dataset that has some"
        )
    records = table.to_pylist()
    bad = [i for i, r in enumerate(records) if not _is_prompt(r[params.prompt_column])]
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} row(s) have no prompt text or chat messages in "
            f"{params.prompt_column!r}, first at row {bad[0]}; drop or fill them"
        )
    render = _renderer(params.prompt_format, tokenizer_path)
    answers = params.answer_column if params.answer_column in table.column_names else None
    rows = [
        {
            "id": str(r["id"]) if "id" in r else str(i),
            "prompt": render(r[params.prompt_column]),
            "source": as_text_value(r[params.prompt_column]),
            "answer": r[answers] if answers else None,
        }
        for i, r in enumerate(records)
    ]
    return ref, rows


def _check_fits(rows: list[dict], max_new_tokens: int, models: dict[str, str]) -> None:
    """Every prompt plus `max_new_tokens` within each model's learned positions (GPT-2's
    `n_positions`; rotary models have no hard limit): refused by name, not an index
    error halfway through decoding."""
    for field, path in models.items():
        if not Path(path).expanduser().is_dir():
            continue
        limit = position_limit(AutoConfig.from_pretrained(path, local_files_only=True))
        if limit is None:
            continue
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        for i, row in enumerate(rows):
            n = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
            if n + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {row['id']!r} (row {i}) is {n} tokens; with max_new_tokens "
                    f"{max_new_tokens} that is past the {limit} positions of {field} ({path}): "
                    "shorten or drop it, or lower max_new_tokens"
                )


def _is_prompt(value: object) -> bool:
    try:
        return not is_empty(as_text_value(value))
    except NotAText:
        return False


def _renderer(prompt_format: PromptFormat, tokenizer_path: str | None) -> Callable[..., str]:
    """Prompt value -> the text the decoders continue."""
    if tokenizer_path is None:
        if prompt_format == "chat":
            raise ValueError(
                "prompt_format: 'chat' needs a model folder to read the chat template from; "
                "no agent is a local folder, so use 'raw'"
            )
        return lambda value: render_prompt(None, as_text_value(value), "raw")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    fmt = resolve_format(prompt_format, tokenizer)
    return lambda value: render_prompt(tokenizer, as_text_value(value), fmt)


def _examples(
    name: str | None, field: str, world_name: str, n: int, seed: int, avoid: set[str]
) -> DatasetRef:
    """A prompt/answer dataset: `name` from the store, or `n` world tasks (none of them in
    `avoid`, the prompts to decode) written once per setting."""
    if name is None:
        avoided = hashlib.sha256("\n".join(sorted(avoid)).encode()).hexdigest()[:8]
        ref = reuse_or_write(
            world_name, f"world:seed{seed}_n{n}_avoid{avoided}", lambda: _world_rows(n, seed, avoid)
        )
    else:
        ref = read_dataset(name)
    table = ref.to_arrow()
    missing = [c for c in ("prompt", "answer") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"dataset {ref.name}@{ref.version} lacks column(s) {missing} (field: {field}); "
            "it needs text columns prompt and answer"
        )
    if table.num_rows == 0:
        raise ValueError(f"dataset {ref.name}@{ref.version} is empty (field: {field})")
    return ref


def _same_tokenizer(field_a: str, path_a: str, field_b: str, path_b: str) -> None:
    """Tokenizers only (no weights): one vocabulary, or a ValueError naming both."""
    _folder_exists(field_a, path_a)
    _folder_exists(field_b, path_b)
    tok_a = AutoTokenizer.from_pretrained(str(path_a), local_files_only=True)
    tok_b = AutoTokenizer.from_pretrained(str(path_b), local_files_only=True)
    check_same_vocab(tok_a, tok_b, f"{field_a} ({path_a})", f"{field_b} ({path_b})")


def _accuracy(rows: list[dict], completions: list[str | None]) -> float | None:
    """Exact match against the answers, or None when the prompts carry none."""
    if any(r["answer"] is None for r in rows):
        return None
    right = [_correct(r, c) is True for r, c in zip(rows, completions, strict=True)]
    return sum(right) / len(right)


def _correct(row: dict, completion: str | None) -> bool | None:
    if row["answer"] is None or completion is None:
        return None
    return completion.strip() == row["answer"].strip()


# --- decoding under a checkpoint, then one write ---


def _decode_rows(
    method: str,
    key_parts: list,
    rows: list[dict],
    decode_chunk: Callable[[list[dict]], list[dict]],
    batch_size: int,
) -> tuple[list[dict], Checkpoint]:
    """Decode chunk by chunk; a killed run resumes at the first chunk not written."""
    ckpt = Checkpoint(data_root() / "_work" / "decode" / method / Checkpoint.key(*key_parts))
    return ckpt.map_chunks("decode", rows, decode_chunk, chunk_size=batch_size), ckpt


def _write_output(
    params: DecodeParams,
    ckpt: Checkpoint,
    rows: list[dict],
    schema: pa.Schema,
    run_id: str,
    inputs: list,
) -> tuple[DatasetRef, bool]:
    # the version is planned once per checkpoint, so a resumed or repeated run reuses it
    version = ckpt.put_once("versions", {"output": new_version()})["output"]
    return write_once(params.output, rows, version, run_id, inputs, schema)


def _common_fields() -> list[tuple[str, pa.DataType]]:
    return [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("writers", pa.list_(pa.string())),
    ]


def _token_rows(chunk: list[dict], out: Decoded, share_column: str, helper: str) -> list[dict]:
    """Output rows of a two-model decoding: text, token ids, writers and the share of
    tokens the helper model wrote."""
    return [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "completion": text,
            "answer": r["answer"],
            "correct": _correct(r, text),
            "writers": writers,
            "token_ids": ids,
            share_column: writers.count(helper) / len(writers) if writers else 0.0,
        }
        for r, text, ids, writers in zip(chunk, out.texts, out.token_ids, out.writers, strict=True)
    ]


def _alone_figures(rows: list[dict], models: dict[str, str], params: DecodeParams) -> dict:
    """`<label> accuracy` of each model alone (greedy) on the same prompts."""
    figures = {}
    for label, path in models.items():
        lm = CausalLM.load(path)
        texts = []
        for start in range(0, len(rows), params.batch_size):
            batch = [r["prompt"] for r in rows[start : start + params.batch_size]]
            ids = greedy_decode(lm, batch, params.max_new_tokens)
            texts += [decode_text(lm, row) for row in ids]
        figures[f"{label} accuracy"] = _figure(_accuracy(rows, texts))
    return figures


def _figure(value: float | None) -> float | str:
    return "n/a (no answers)" if value is None else value


# --- decode/co-llm ---

CO_LLM_SOURCE = _source(co_llm_module, stepping)
CO_LLM_SCHEMA = pa.schema(
    [*_common_fields(), ("token_ids", pa.list_(pa.int64())), ("deferral_share", pa.float64())]
)


@task(name="check-inputs")
def check_co_llm_inputs(params: CoLLMParams) -> dict:
    """Before any weights load: folders, one vocabulary, eta, the three datasets."""
    _same_tokenizer("base_model", params.base_model, "assistant_model", params.assistant_model)
    if params.eta is not None:
        co_llm_module.check_eta(params.eta)
    if params.assistant_backend is not None:
        params.assistant_backend.check()
    prompts, rows = _prompt_rows(params, params.base_model)
    _check_fits(
        rows,
        params.max_new_tokens,
        {"base_model": params.base_model, "assistant_model": params.assistant_model},
    )
    if params.sweep_reward_model is not None:
        _reward_model(params.sweep_reward_model, None, "sweep_reward_model")
    held_out = {r["prompt"] for r in rows}
    examples = _examples(
        params.train_dataset,
        "train_dataset",
        WORLD_EXAMPLES,
        params.world_examples,
        params.seed,
        held_out,
    )
    validation = _examples(
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
            init_steps=params.init_steps,
            steps=params.steps,
            batch_size=params.train_batch_size,
            head_lr=params.head_lr,
            lr=params.lr,
            seed=params.seed,
            prompt_format=params.prompt_format,
            max_length=params.max_length,
            over_length=params.over_length,
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
    score = _reward_fn(reward, [])

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
        _work_key(params, data),
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
            return _token_rows(chunk, out, "deferral_share", "assistant")

        rows, ckpt = _decode_rows("co-llm", key, data["rows"], decode_chunk, params.batch_size)
    inputs = [data["prompts"], model, *model_inputs(spec)]
    return _write_output(params, ckpt, rows, CO_LLM_SCHEMA, run_id, inputs)


def _work_key(params: DecodeParams, data: dict) -> list:
    """What a decoding's rows depend on besides the models: prompts and settings."""
    prompts = data["prompts"]
    settings = params.model_dump(
        mode="json", include={"prompt_column", "answer_column", "limit", "max_new_tokens"}
    )
    return [f"{prompts.name}@{prompts.version}", settings]


def _share(rows: list[dict], writer: str) -> float:
    """The fraction of all written tokens that `writer` wrote."""
    total = sum(len(r["writers"]) for r in rows)
    return sum(r["writers"].count(writer) for r in rows) / total if total else 0.0


# defaults in the signature: the UI shows and pre-fills them
CO_LLM_FLOW_DEFAULTS = CoLLMParams()


@flow(name="decode")
def co_llm_flow(params: CoLLMParams = CO_LLM_FLOW_DEFAULTS) -> dict:
    """Co-LLM: a base model that defers tokens to an assistant, eta chosen on validation."""
    started = time.monotonic()
    with tracked_run("decode/co-llm", params.model_dump(mode="json")) as run_id:
        data = check_co_llm_inputs(params)
        model = train_pair(params, data, run_id)
        chosen = choose_eta(params, model, data, run_id)
        output, reused = decode_co_llm(params, model, data, chosen["eta"], run_id)
        rows = _rows(output)
        figures = {
            "model": f"{model.name}@{model.version}",
            "reused earlier model": model.meta["produced_by"] != run_id,
            "output": f"{output.name}@{output.version}",
            "reused earlier output": reused,
            "prompts": len(rows),
            "eta": chosen["eta"],
            "eta chosen by": "the validation sweep" if params.eta is None else "the eta parameter",
            "accuracy": _figure(_accuracy(rows, [r["completion"] for r in rows])),
            "share of tokens deferred": _share(rows, "assistant"),
            **length_figures({"train": model.meta["metrics"].get("length", {})}),
        }
        if params.baselines:
            alone = {"base alone": params.base_model, "assistant alone": params.assistant_model}
            figures |= _alone_figures(data["rows"], alone, params)
        figures["seconds"] = round(time.monotonic() - started, 2)
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
        summary_artifact("decode-co-llm", "Co-LLM decoding", figures, extra)
        return {"figures": figures, "sweep": chosen.get("results")}


# --- decode/hybrid ---

HYBRID_SOURCE = _source(hybrid_module, stepping)
HYBRID_SCHEMA = pa.schema(
    [*_common_fields(), ("token_ids", pa.list_(pa.int64())), ("large_share", pa.float64())]
)


@task(name="check-inputs")
def check_hybrid_inputs(params: HybridParams) -> dict:
    """Before any weights load: folders, one vocabulary, the threshold, the prompts."""
    _same_tokenizer("small_model", params.small_model, "large_model", params.large_model)
    check_threshold(params.measure, params.threshold)
    prompts, rows = _prompt_rows(params, params.small_model)
    _check_fits(
        rows,
        params.max_new_tokens,
        {"small_model": params.small_model, "large_model": params.large_model},
    )
    return {"prompts": prompts, "rows": rows}


@task(name="decode-hybrid")
def decode_hybrid(params: HybridParams, data: dict, run_id: str) -> tuple[DatasetRef, bool]:
    small, large = CausalLM.load(params.small_model), CausalLM.load(params.large_model)

    def decode_chunk(chunk: list[dict]) -> list[dict]:
        out = hybrid_decode(
            small,
            large,
            [r["prompt"] for r in chunk],
            threshold=params.threshold,
            measure=params.measure,
            max_new_tokens=params.max_new_tokens,
            batch_size=params.batch_size,
        )
        return _token_rows(chunk, out, "large_share", "large")

    specs = [BackendSpec(model=params.small_model), BackendSpec(model=params.large_model)]
    key = [
        [model_fingerprint(s) for s in specs],
        params.measure,
        params.threshold,
        HYBRID_SOURCE,
        _work_key(params, data),
    ]
    rows, ckpt = _decode_rows("hybrid", key, data["rows"], decode_chunk, params.batch_size)
    inputs = [data["prompts"], *(ref for s in specs for ref in model_inputs(s))]
    return _write_output(params, ckpt, rows, HYBRID_SCHEMA, run_id, inputs)


# defaults in the signature: the UI shows and pre-fills them
HYBRID_FLOW_DEFAULTS = HybridParams()


@flow(name="decode")
def hybrid_flow(params: HybridParams = HYBRID_FLOW_DEFAULTS) -> dict:
    """Hybrid gating: the small model writes, its uncertain tokens go to the large one."""
    started = time.monotonic()
    with tracked_run("decode/hybrid", params.model_dump(mode="json")) as run_id:
        data = check_hybrid_inputs(params)
        output, reused = decode_hybrid(params, data, run_id)
        rows = _rows(output)
        figures = {
            "output": f"{output.name}@{output.version}",
            "reused earlier output": reused,
            "prompts": len(rows),
            "measure": params.measure,
            "threshold": params.threshold,
            "accuracy": _figure(_accuracy(rows, [r["completion"] for r in rows])),
            "share of tokens sent to the large model": _share(rows, "large"),
        }
        if params.baselines:
            alone = {"small alone": params.small_model, "large alone": params.large_model}
            figures |= _alone_figures(data["rows"], alone, params)
        figures["seconds"] = round(time.monotonic() - started, 2)
        summary_artifact("decode-hybrid", "Hybrid small/large token gating", figures)
        return {"figures": figures}


def _rows(output: DatasetRef) -> list[dict]:
    """The written rows as Python values (None stays None, lists stay lists)."""
    return output.to_arrow().to_pylist()


# --- decode/collab ---

COLLAB_SOURCE = _source(collab_module)
COLLAB_SCHEMA = pa.schema(
    [
        *_common_fields(),
        ("tokens", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("reward", pa.float64()),
        ("model_calls", pa.int64()),
        ("reward_calls", pa.int64()),
        ("switches", pa.int64()),
        ("failed_calls", pa.int64()),
        ("failures", pa.string()),  # JSON: stage, agent, step, error and the raw response
    ]
)


def _agent_names(agents: list[BackendSpec]) -> list[str]:
    """Readable, distinct agent names: the model folder's name, numbered when repeated."""
    names = [Path(a.model).name or a.model for a in agents]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@task(name="check-inputs")
def check_collab_inputs(params: CollabParams) -> dict:
    """Before any weights load: agents, the reward model, the prompts (with answers when
    the reward is the world's checker)."""
    for i, agent in enumerate(params.agents):
        try:
            agent.check()
        except Exception as err:
            raise type(err)(f"agents[{i}]: {err}") from err
    # the first agent that is a local folder gives the chat template
    local = [a.model for a in params.agents if Path(a.model).expanduser().is_dir()]
    prompts, rows = _prompt_rows(params, local[0] if local else None)
    local_agents = {f"agents[{i}]": a.model for i, a in enumerate(params.agents)}
    # Collab's rollouts run up to rollout_len past each proposed token as well
    _check_fits(rows, params.max_new_tokens + params.rollout_len, local_agents)
    reward = None
    if params.reward_model == WORLD_REWARD:
        if any(r["answer"] is None for r in rows):
            raise ValueError(
                f"reward_model {WORLD_REWARD!r} scores against the answer column, and "
                f"{prompts.name} has no {params.answer_column!r} values for every row; "
                "name a reward model trained with reward/train instead"
            )
    else:
        reward = _reward_model(params.reward_model, params.reward_version, "reward_model")
    return {"prompts": prompts, "rows": rows, "reward": reward}


def _reward_model(name: str, version: str | None, field: str) -> ModelRef:
    reward = read_model(name, version)
    if reward.meta["kind"] not in ("bradley-terry", "ensemble"):
        raise ValueError(
            f"{field}: {reward.name}@{reward.version} is a {reward.meta['kind']!r} "
            "model, not a reward model; train one with reward/train"
        )
    return reward


class _TargetReward:
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


def _reward_fn(reward: ModelRef | None, rows: list[dict]) -> _TargetReward:
    return _TargetReward(reward, rows)


@task(name="decode-collab", **MODEL_CALLS)
def decode_collab(params: CollabParams, data: dict, run_id: str) -> tuple[DatasetRef, bool, dict]:
    names = _agent_names(params.agents)
    reward = _reward_fn(data["reward"], data["rows"])
    agents = [make_backend(spec) for spec in params.agents]

    def decode_chunk(chunk: list[dict]) -> list[dict]:
        outs = collab_decode(agents, reward, [r["prompt"] for r in chunk], params.config())
        return [
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "completion": None if out.finish_reason == "failed" else out.completion,
                "answer": r["answer"],
                "correct": _correct(r, None if out.finish_reason == "failed" else out.completion),
                "writers": [names[a] for a in out.agents],
                "tokens": out.tokens,
                "finish_reason": out.finish_reason,
                "reward": out.reward,
                "model_calls": out.model_calls,
                "reward_calls": out.reward_calls,
                "switches": out.switches,
                "failed_calls": len(out.failures),
                "failures": json.dumps([f.__dict__ for f in out.failures]),
            }
            for r, out in zip(chunk, outs, strict=True)
        ]

    reward_key = (
        "world" if data["reward"] is None else f"{data['reward'].name}@{data['reward'].version}"
    )
    key = [
        [model_fingerprint(s) for s in params.agents],
        reward_key,
        params.config().model_dump(mode="json"),
        COLLAB_SOURCE,
        _work_key(params, data),
    ]
    try:
        rows, ckpt = _decode_rows("collab", key, data["rows"], decode_chunk, params.batch_size)
    finally:
        for agent in agents:
            agent.close()
    inputs = [
        data["prompts"],
        *([data["reward"]] if data["reward"] is not None else []),
        *(ref for s in params.agents for ref in model_inputs(s)),
    ]
    return (*_write_output(params, ckpt, rows, COLLAB_SCHEMA, run_id, inputs), reward.length())


@task(name="agents-alone", **MODEL_CALLS)
def agents_alone(params: CollabParams, data: dict) -> dict[str, dict]:
    """Each agent's greedy completion, scored by the same target reward. A malformed
    answer counts as wrong, is left out of the mean reward, and is counted and logged
    with its raw text."""
    reward = _reward_fn(data["reward"], data["rows"])
    prompts = [r["prompt"] for r in data["rows"]]
    # each agent alone reads the prompts as given, in its own prompt format
    given = [r.get("source", r["prompt"]) for r in data["rows"]]
    out = {}
    for name, spec in zip(_agent_names(params.agents), params.agents, strict=True):
        with make_backend(spec) as agent:
            answers = call_each(
                lambda batch, agent=agent: agent.generate(
                    batch, max_new_tokens=params.max_new_tokens, temperature=0.0, stop=params.stop
                ),
                given,
            )
        texts = [a if isinstance(a, str) else None for a in answers]
        answered = [i for i, t in enumerate(texts) if t is not None]
        for i in (i for i, t in enumerate(texts) if t is None):
            log.warning("%s alone, prompt %d: %s; raw: %.500r", name, i, answers[i], answers[i].raw)
        scores = reward([prompts[i] for i in answered], [texts[i] for i in answered])
        out[name] = {
            "mean reward": sum(scores) / len(scores) if scores else None,
            "accuracy": _accuracy(data["rows"], texts),
            "failed calls": len(prompts) - len(answered),
        }
    return out


# defaults in the signature: the UI shows and pre-fills them
COLLAB_FLOW_DEFAULTS = CollabParams()


@flow(name="decode")
def collab_flow(params: CollabParams = COLLAB_FLOW_DEFAULTS) -> dict:
    """Collab: agents propose tokens, a target reward's rollouts pick token and agent."""
    started = time.monotonic()
    with tracked_run("decode/collab", params.model_dump(mode="json")) as run_id:
        data = check_collab_inputs(params)
        output, reused, length = decode_collab(params, data, run_id)
        rows = _rows(output)
        scored = [r["reward"] for r in rows if r["reward"] is not None]
        figures = {
            "output": f"{output.name}@{output.version}",
            "reused earlier output": reused,
            "prompts": len(rows),
            "target reward": params.reward_model,
            "mean target reward": sum(scored) / len(scored) if scored else "n/a (all failed)",
            "accuracy": _figure(_accuracy(rows, [r["completion"] for r in rows])),
            "model calls per prompt": sum(r["model_calls"] for r in rows) / len(rows),
            "agent switches per prompt": sum(r["switches"] for r in rows) / len(rows),
            "prompts failed": sum(r["finish_reason"] == "failed" for r in rows),
            "failed model calls": sum(r["failed_calls"] for r in rows),
            **length_figures(length),
        }
        for name in _agent_names(params.agents):
            figures[f"share of tokens by {name}"] = _share(rows, name)
        if params.baselines:
            for name, alone in agents_alone(params, data).items():
                figures[f"{name} alone: mean target reward"] = _figure(alone["mean reward"])
                figures[f"{name} alone: accuracy"] = _figure(alone["accuracy"])
                figures[f"{name} alone: failed calls"] = alone["failed calls"]
        figures["seconds"] = round(time.monotonic() - started, 2)
        summary_artifact("decode-collab", "Collab decoding", figures)
        return {"figures": figures}
