"""`decode/hybrid`: the small model writes, uncertain tokens go to the large one; the
method is `flywheel.decoders.hybrid`."""

from __future__ import annotations

import logging

import pyarrow as pa
from prefect import task
from pydantic import Field, model_validator

from flywheel.decoders import hybrid as hybrid_module
from flywheel.decoders import stepping
from flywheel.decoders.hybrid import HybridConfig, check_threshold, hybrid_decode
from flywheel.decoders.stepping import (
    CausalLM,
)
from flywheel.flows.decode.common import (
    DecodeParams,
    accuracy,
    alone_figures,
    check_fits,
    code_hash,
    common_fields,
    decode_rows,
    figure,
    large_model,
    output_rows,
    prompt_rows,
    same_tokenizer,
    share,
    token_rows,
    work_key,
    write_output,
)
from flywheel.flows.reward import default_backbone
from flywheel.flows.tracking import (
    Deployment,
    model_inputs,
)
from flywheel.llm import BackendSpec, model_fingerprint
from flywheel.store import (
    DatasetRef,
)

log = logging.getLogger(__name__)


class HybridParams(DecodeParams, HybridConfig):
    """Parameters of `decode/hybrid`: the gate (`HybridConfig`: measure, threshold), the
    decoders' common ones, and the two models."""

    small_model: str = Field(default_factory=default_backbone, description="writes by default")
    large_model: str = Field(default_factory=large_model, description="takes uncertain tokens")

    @model_validator(mode="after")
    def _output(self) -> HybridParams:
        self.output = self.output or "decoded_hybrid"
        return self


# --- decode/hybrid ---

HYBRID_SOURCE = code_hash(hybrid_module, stepping)
HYBRID_SCHEMA = pa.schema(
    [*common_fields(), ("token_ids", pa.list_(pa.int64())), ("large_share", pa.float64())]
)


@task(name="check-inputs")
def check_hybrid_inputs(params: HybridParams) -> dict:
    """Before any weights load: folders, one vocabulary, the threshold, the prompts."""
    same_tokenizer("small_model", params.small_model, "large_model", params.large_model)
    check_threshold(params.measure, params.threshold)
    prompts, rows = prompt_rows(params, params.small_model)
    check_fits(
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
        return token_rows(chunk, out, "large_share", "large")

    specs = [BackendSpec(model=params.small_model), BackendSpec(model=params.large_model)]
    key = [
        [model_fingerprint(s) for s in specs],
        params.measure,
        params.threshold,
        HYBRID_SOURCE,
        work_key(params, data),
    ]
    rows, ckpt = decode_rows("hybrid", key, data["rows"], decode_chunk, params.batch_size)
    inputs = [data["prompts"], *(ref for s in specs for ref in model_inputs(s))]
    return write_output(params, ckpt, rows, HYBRID_SCHEMA, run_id, inputs)


HYBRID_FLOW_DEFAULTS = HybridParams()
HYBRID = Deployment("decode/hybrid", "Hybrid small/large token gating", nightly_utc="0 7 * * *")


@HYBRID.flow
def hybrid_flow(params: HybridParams = HYBRID_FLOW_DEFAULTS) -> dict:
    """Hybrid gating: the small model writes, its uncertain tokens go to the large one."""
    with HYBRID.run(params) as run:
        data = check_hybrid_inputs(params)
        output, reused = decode_hybrid(params, data, run.id)
        rows = output_rows(output)
        figures = {
            "output": f"{output.name}@{output.version}",
            "reused earlier output": reused,
            "prompts": len(rows),
            "measure": params.measure,
            "threshold": params.threshold,
            "accuracy": figure(accuracy(rows, [r["completion"] for r in rows])),
            "share of tokens sent to the large model": share(rows, "large"),
        }
        if params.baselines:
            alone = {"small alone": params.small_model, "large alone": params.large_model}
            figures |= alone_figures(data["rows"], alone, params)
        run.summary(figures)
        return {"figures": figures}
