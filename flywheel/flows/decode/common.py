"""What the three decoder flows share: their common parameters, reading and checking the
prompts, decoding in checkpointed chunks, writing the output once, the models alone."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import AutoConfig, AutoTokenizer

from flywheel.decoders.stepping import (
    CausalLM,
    Decoded,
    check_same_vocab,
    decode_text,
    greedy_decode,
)
from flywheel.flows.tracking import (
    reuse_or_write,
    write_once,
)
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
    validate_name,
)
from flywheel.store.datasets import new_version
from flywheel.world.bootstrap import HELD_OUT_TASK_SEED, model_dir, models_root
from flywheel.world.tasks import MAX_LEN, sample_tasks

WORLD_PROMPTS = "world_decode_prompts"
WORLD_EXAMPLES = "world_co_llm_examples"
WORLD_VALIDATION = "world_co_llm_validation"
ETA_SWEEP = "co_llm_eta_sweep"
WORLD_REWARD = "world"  # the world's own checker as the target reward (1 right, 0 wrong)

log = logging.getLogger(__name__)


def code_hash(*modules) -> str:
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()


def large_model() -> str:
    return str(model_dir(models_root(), "large"))


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


def folder_exists(field: str, path: str) -> None:
    if not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"{field}: no model folder at {path}; run `prefect deployment run world/bootstrap` "
            "for the world models, or pass a model folder"
        )


# --- inputs ---


def world_rows(n: int, seed: int, avoid: set[str] = frozenset()) -> list[dict]:
    """World tasks as prompt/answer rows, leaving out the prompts in `avoid`."""
    return [
        {"id": t.id, "prompt": t.prompt, "answer": t.answer, "family": t.family}
        for t in sample_tasks(n, random.Random(seed))
        if t.prompt not in avoid
    ]


def prompt_rows(
    params: DecodeParams, tokenizer_path: str | None = None
) -> tuple[DatasetRef, list[dict]]:
    """The prompts dataset and its rows as {id, prompt, answer}, checked. Each prompt
    (text or chat messages) is rendered as the model at `tokenizer_path` reads it; no
    tokenizer (HTTP agents only): text as it is, messages as `role: content` lines."""
    if params.prompts == WORLD_PROMPTS and params.prompts_version is None:
        ref = reuse_or_write(
            WORLD_PROMPTS,
            f"world:seed{HELD_OUT_TASK_SEED}_n{params.world_prompts}",
            lambda: world_rows(params.world_prompts, HELD_OUT_TASK_SEED),
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
    bad = [i for i, r in enumerate(records) if not is_prompt(r[params.prompt_column])]
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} row(s) have no prompt text or chat messages in "
            f"{params.prompt_column!r}, first at row {bad[0]}; drop or fill them"
        )
    render = renderer(params.prompt_format, tokenizer_path)
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


def check_fits(rows: list[dict], max_new_tokens: int, models: dict[str, str]) -> None:
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


def is_prompt(value: object) -> bool:
    try:
        return not is_empty(as_text_value(value))
    except NotAText:
        return False


def renderer(prompt_format: PromptFormat, tokenizer_path: str | None) -> Callable[..., str]:
    """Prompt value -> the text the decoders continue."""
    if tokenizer_path is None:
        if prompt_format == "chat":
            raise ValueError(
                "prompt_format: 'chat' needs a model folder to read the chat template from; "
                "no agent is a local folder, so use 'raw'"
            )
        return lambda value: render_prompt(None, as_text_value(value), "raw")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    fmt = resolve_format(prompt_format, tokenizer)
    return lambda value: render_prompt(tokenizer, as_text_value(value), fmt)


def examples_dataset(
    name: str | None, field: str, world_name: str, n: int, seed: int, avoid: set[str]
) -> DatasetRef:
    """A prompt/answer dataset: `name` from the store, or `n` world tasks (none of them in
    `avoid`, the prompts to decode) written once per setting."""
    if name is None:
        avoided = hashlib.sha256("\n".join(sorted(avoid)).encode()).hexdigest()[:8]
        ref = reuse_or_write(
            world_name, f"world:seed{seed}_n{n}_avoid{avoided}", lambda: world_rows(n, seed, avoid)
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


def same_tokenizer(field_a: str, path_a: str, field_b: str, path_b: str) -> None:
    """Tokenizers only (no weights): one vocabulary, or a ValueError naming both."""
    folder_exists(field_a, path_a)
    folder_exists(field_b, path_b)
    tok_a = AutoTokenizer.from_pretrained(str(path_a), local_files_only=True)
    tok_b = AutoTokenizer.from_pretrained(str(path_b), local_files_only=True)
    check_same_vocab(tok_a, tok_b, f"{field_a} ({path_a})", f"{field_b} ({path_b})")


def accuracy(rows: list[dict], completions: list[str | None]) -> float | None:
    """Exact match against the answers, or None when the prompts carry none."""
    if any(r["answer"] is None for r in rows):
        return None
    right = [correct(r, c) is True for r, c in zip(rows, completions, strict=True)]
    return sum(right) / len(right)


def correct(row: dict, completion: str | None) -> bool | None:
    if row["answer"] is None or completion is None:
        return None
    return completion.strip() == row["answer"].strip()


# --- decoding under a checkpoint, then one write ---


def decode_rows(
    method: str,
    key_parts: list,
    rows: list[dict],
    decode_chunk: Callable[[list[dict]], list[dict]],
    batch_size: int,
) -> tuple[list[dict], Checkpoint]:
    """Decode chunk by chunk; a killed run resumes at the first chunk not written."""
    ckpt = Checkpoint(data_root() / "_work" / "decode" / method / Checkpoint.key(*key_parts))
    return ckpt.map_chunks("decode", rows, decode_chunk, chunk_size=batch_size), ckpt


def write_output(
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


def common_fields() -> list[tuple[str, pa.DataType]]:
    return [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("writers", pa.list_(pa.string())),
    ]


def token_rows(chunk: list[dict], out: Decoded, share_column: str, helper: str) -> list[dict]:
    """Output rows of a two-model decoding: text, token ids, writers and the share of
    tokens the helper model wrote."""
    return [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "completion": text,
            "answer": r["answer"],
            "correct": correct(r, text),
            "writers": writers,
            "token_ids": ids,
            share_column: writers.count(helper) / len(writers) if writers else 0.0,
        }
        for r, text, ids, writers in zip(chunk, out.texts, out.token_ids, out.writers, strict=True)
    ]


def alone_figures(rows: list[dict], models: dict[str, str], params: DecodeParams) -> dict:
    """`<label> accuracy` of each model alone (greedy) on the same prompts."""
    figures = {}
    for label, path in models.items():
        lm = CausalLM.load(path)
        texts = []
        for start in range(0, len(rows), params.batch_size):
            batch = [r["prompt"] for r in rows[start : start + params.batch_size]]
            ids = greedy_decode(lm, batch, params.max_new_tokens)
            texts += [decode_text(lm, row) for row in ids]
        figures[f"{label} accuracy"] = figure(accuracy(rows, texts))
    return figures


def figure(value: float | None) -> float | str:
    return "n/a (no answers)" if value is None else value


def work_key(params: DecodeParams, data: dict) -> list:
    """What a decoding's rows depend on besides the models: prompts and settings."""
    prompts = data["prompts"]
    settings = params.model_dump(
        mode="json", include={"prompt_column", "answer_column", "limit", "max_new_tokens"}
    )
    return [f"{prompts.name}@{prompts.version}", settings]


def share(rows: list[dict], writer: str) -> float:
    """The fraction of all written tokens that `writer` wrote."""
    total = sum(len(r["writers"]) for r in rows)
    return sum(r["writers"].count(writer) for r in rows) / total if total else 0.0


def output_rows(output: DatasetRef) -> list[dict]:
    """The written rows as Python values (None stays None, lists stay lists)."""
    return output.to_arrow().to_pylist()


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
