"""A decoder flow's inputs, read and checked before any weights load: the model folders
and their tokenizers (each loaded once for every check), the prompts rendered as the
models read them and within their positions, and the prompt/answer example datasets."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from flywheel.decoders.stepping import check_same_vocab
from flywheel.flows.decode.common import WORLD_PROMPTS, DecodeInputs, DecodeParams
from flywheel.flows.outputs import reuse_or_write
from flywheel.llm.chat import (
    NotAText,
    PromptFormat,
    as_text_value,
    is_empty,
    render_prompt,
    resolve_format,
)
from flywheel.llm.tokens import position_limit
from flywheel.store import DatasetRef, read_dataset
from flywheel.world.bootstrap import HELD_OUT_TASK_SEED
from flywheel.world.tasks import sample_tasks


@dataclass(frozen=True)
class LocalModel:
    """A model folder a parameter names, with its tokenizer."""

    field: str
    path: str
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def load(cls, field: str, path: str) -> LocalModel:
        """The tokenizer only (no weights), or an error naming the field and the fix."""
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(
                f"{field}: no model folder at {path}; run `prefect deployment run "
                "world/bootstrap` for the world models, or pass a model folder"
            )
        return cls(field, path, AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def shared_vocabulary(*models: tuple[str, str]) -> list[LocalModel]:
    """Models that write one text token by token, as (field, folder): loaded, and sharing
    one vocabulary with the first, or a ValueError naming both."""
    loaded = [LocalModel.load(field, path) for field, path in models]
    first = loaded[0]
    for other in loaded[1:]:
        check_same_vocab(
            first.tokenizer,
            other.tokenizer,
            f"{first.field} ({first.path})",
            f"{other.field} ({other.path})",
        )
    return loaded


def read_prompts(
    params: DecodeParams, models: Sequence[LocalModel], rollout: int = 0
) -> DecodeInputs:
    """The prompts, rendered as the first model reads them (no model: as given), and
    each within every model's positions with `max_new_tokens` + `rollout` tokens more."""
    prompts, rows = prompt_rows(params, models[0].tokenizer if models else None)
    check_fits(rows, params.max_new_tokens + rollout, models)
    return DecodeInputs(prompts, rows)


def world_rows(n: int, seed: int, avoid: set[str] = frozenset()) -> list[dict]:
    """World tasks as prompt/answer rows, leaving out the prompts in `avoid`."""
    return [
        {"id": t.id, "prompt": t.prompt, "answer": t.answer, "family": t.family}
        for t in sample_tasks(n, random.Random(seed))
        if t.prompt not in avoid
    ]


def prompt_rows(
    params: DecodeParams, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[DatasetRef, list[dict]]:
    """The prompts dataset and its rows as {id, prompt, source, answer}, checked. Each
    prompt (text or chat messages) is rendered as a model with `tokenizer` reads it; no
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
    render = renderer(params.prompt_format, tokenizer)
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


def check_fits(rows: list[dict], max_new_tokens: int, models: Sequence[LocalModel]) -> None:
    """Every prompt plus `max_new_tokens` within each model's learned positions (GPT-2's
    `n_positions`; rotary models have no hard limit): refused by name, not an index
    error halfway through decoding."""
    for model in models:
        limit = position_limit(AutoConfig.from_pretrained(model.path, local_files_only=True))
        if limit is None:
            continue
        for i, row in enumerate(rows):
            n = len(model.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
            if n + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {row['id']!r} (row {i}) is {n} tokens; with max_new_tokens "
                    f"{max_new_tokens} that is past the {limit} positions of {model.field} "
                    f"({model.path}): shorten or drop it, or lower max_new_tokens"
                )


def is_prompt(value: object) -> bool:
    try:
        return not is_empty(as_text_value(value))
    except NotAText:
        return False


def renderer(
    prompt_format: PromptFormat, tokenizer: PreTrainedTokenizerBase | None
) -> Callable[..., str]:
    """Prompt value -> the text the decoders continue."""
    if tokenizer is None:
        if prompt_format == "chat":
            raise ValueError(
                "prompt_format: 'chat' needs a model folder to read the chat template from; "
                "no agent is a local folder, so use 'raw'"
            )
        return lambda value: render_prompt(None, as_text_value(value), "raw")
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


def example_pairs(ref: DatasetRef) -> list[tuple[str, str]]:
    """An `examples_dataset`'s rows as (prompt, answer)."""
    table = ref.to_pandas()
    return list(zip(table["prompt"], table["answer"], strict=True))
