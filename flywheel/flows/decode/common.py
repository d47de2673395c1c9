"""What the three decoder flows share: their common parameters, the checked inputs they
pass on, decoding in checkpointed chunks and writing the output once, and the figures
every one of them reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel.decoders.evaluation import accuracy, correct, greedy_texts, share
from flywheel.decoders.stepping import CausalLM, Decoded
from flywheel.flows.outputs import write_once
from flywheel.llm.chat import PromptFormat
from flywheel.store import Checkpoint, DatasetRef, data_root, validate_name
from flywheel.store.naming import new_version
from flywheel.world.bootstrap import model_dir, models_root
from flywheel.world.tasks import MAX_LEN

WORLD_PROMPTS = "world_decode_prompts"
WORLD_EXAMPLES = "world_co_llm_examples"
WORLD_VALIDATION = "world_co_llm_validation"
ETA_SWEEP = "co_llm_eta_sweep"
WORLD_REWARD = "world"  # the world's own checker as the target reward (1 right, 0 wrong)


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


@dataclass(frozen=True)
class DecodeInputs:
    """The checked prompts: their dataset, and its rows as {id, prompt (rendered as the
    models read it), source (as the dataset gave it), answer (None: none)}."""

    prompts: DatasetRef
    rows: list[dict]


@dataclass(frozen=True)
class Written:
    """A decoding's output dataset: the version this run wrote, or the one an earlier
    (killed or repeated) run wrote for the same work."""

    output: DatasetRef
    reused: bool
    # what the target reward model cut for length while scoring (Collab); else empty
    length: dict[str, dict] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """The written rows as Python values (None stays None, lists stay lists)."""
        return self.output.to_arrow().to_pylist()

    def figures(self, rows: list[dict]) -> dict:
        return {
            "output": f"{self.output.name}@{self.output.version}",
            "reused earlier output": self.reused,
            "prompts": len(rows),
        }


def decode_and_write(
    params: DecodeParams,
    data: DecodeInputs,
    run_id: str,
    *,
    method: str,
    key: list,
    decode_chunk: Callable[[list[dict]], list[dict]],
    schema: pa.Schema,
    lineage: list,
) -> Written:
    """Decode `data.rows` chunk by chunk under a checkpoint, then write them once. The
    checkpoint is keyed by `key` (models, method settings, code) and the prompts and
    decoding settings: a killed run resumes at the first chunk not written."""
    settings = params.model_dump(
        mode="json", include={"prompt_column", "answer_column", "limit", "max_new_tokens"}
    )
    work = [f"{data.prompts.name}@{data.prompts.version}", settings]
    ckpt = Checkpoint(data_root() / "_work" / "decode" / method / Checkpoint.key(*key, work))
    rows = ckpt.map_chunks("decode", data.rows, decode_chunk, chunk_size=params.batch_size)
    # the version is planned once per checkpoint, so a resumed or repeated run reuses it
    version = ckpt.put_once("versions", {"output": new_version()})["output"]
    inputs = [data.prompts, *lineage]
    output, reused = write_once(params.output, rows, version, run_id, inputs, schema)
    return Written(output, reused)


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
            "correct": correct(r["answer"], text),
            "writers": writers,
            "token_ids": ids,
            share_column: writers.count(helper) / len(writers) if writers else 0.0,
        }
        for r, text, ids, writers in zip(chunk, out.texts, out.token_ids, out.writers, strict=True)
    ]


def figure(value: float | None) -> float | str:
    return "n/a (no answers)" if value is None else value


def accuracy_figure(rows: list[dict], completions: list[str | None]) -> float | str:
    """Exact-match accuracy of `completions` against the rows' answers, as a figure."""
    return figure(accuracy([r["answer"] for r in rows], completions))


def output_accuracy(rows: list[dict]) -> float | str:
    """The written rows' exact-match accuracy, as a figure."""
    return accuracy_figure(rows, [r["completion"] for r in rows])


def writer_share(rows: list[dict], writer: str) -> float:
    """The fraction of all tokens in the written rows that `writer` wrote."""
    return share([r["writers"] for r in rows], writer)


def alone_figures(rows: list[dict], models: dict[str, str], params: DecodeParams) -> dict:
    """`<label> accuracy` of each model alone (greedy) on the same prompts."""
    prompts = [r["prompt"] for r in rows]
    return {
        f"{label} accuracy": accuracy_figure(
            rows,
            greedy_texts(CausalLM.load(path), prompts, params.max_new_tokens, params.batch_size),
        )
        for label, path in models.items()
    }
