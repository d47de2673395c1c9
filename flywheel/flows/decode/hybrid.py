"""`decode/hybrid`: the small model writes, uncertain tokens go to the large one; the
method is `flywheel.decoders.hybrid`."""

from __future__ import annotations

import pyarrow as pa
from prefect import task
from pydantic import Field, model_validator

from flywheel.decoders import hybrid as hybrid_module
from flywheel.decoders import stepping
from flywheel.decoders.hybrid import HybridConfig, check_threshold, hybrid_decode
from flywheel.decoders.stepping import CausalLM
from flywheel.flows.decode.common import (
    DecodeInputs,
    DecodeParams,
    Written,
    alone_figures,
    common_fields,
    decode_and_write,
    large_model,
    output_accuracy,
    token_rows,
    writer_share,
)
from flywheel.flows.decode.inputs import read_prompts, shared_vocabulary
from flywheel.flows.pair_training import code_hash, default_backbone
from flywheel.flows.tracking import Deployment, FlowRun, model_inputs
from flywheel.llm import BackendSpec, model_fingerprint


class HybridParams(DecodeParams, HybridConfig):
    """Parameters of `decode/hybrid`: the gate (`HybridConfig`: measure, threshold), the
    decoders' common ones, and the two models."""

    small_model: str = Field(default_factory=default_backbone, description="writes by default")
    large_model: str = Field(default_factory=large_model, description="takes uncertain tokens")

    @model_validator(mode="after")
    def _output(self) -> HybridParams:
        self.output = self.output or "decoded_hybrid"
        return self


HYBRID_SOURCE = code_hash(hybrid_module, stepping)
HYBRID_SCHEMA = pa.schema(
    [*common_fields(), ("token_ids", pa.list_(pa.int64())), ("large_share", pa.float64())]
)


@task(name="check-inputs")
def check_hybrid_inputs(params: HybridParams) -> DecodeInputs:
    """Before any weights load: folders, one vocabulary, the threshold, the prompts."""
    pair = shared_vocabulary(
        ("small_model", params.small_model), ("large_model", params.large_model)
    )
    check_threshold(params.measure, params.threshold)
    return read_prompts(params, pair)


@task(name="decode-hybrid")
def decode_hybrid(params: HybridParams, data: DecodeInputs, run_id: str) -> Written:
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
    fingerprints = [model_fingerprint(s) for s in specs]
    return decode_and_write(
        params,
        data,
        run_id,
        method="hybrid",
        key=[fingerprints, params.measure, params.threshold, HYBRID_SOURCE],
        decode_chunk=decode_chunk,
        schema=HYBRID_SCHEMA,
        lineage=[ref for s in specs for ref in model_inputs(s)],
    )


HYBRID = Deployment("decode/hybrid", "Hybrid small/large token gating", HybridParams)


@HYBRID.flow(check=check_hybrid_inputs)
def hybrid_flow(params: HybridParams, data: DecodeInputs, run: FlowRun) -> dict:
    """Hybrid gating: the small model writes, its uncertain tokens go to the large one."""
    written = decode_hybrid(params, data, run.id)
    rows = written.rows()
    figures = {
        **written.figures(rows),
        "measure": params.measure,
        "threshold": params.threshold,
        "accuracy": output_accuracy(rows),
        "share of tokens sent to the large model": writer_share(rows, "large"),
    }
    if params.baselines:
        alone = {"small alone": params.small_model, "large alone": params.large_model}
        figures |= alone_figures(data.rows, alone, params)
    run.summary(figures)
    return {"figures": figures}
