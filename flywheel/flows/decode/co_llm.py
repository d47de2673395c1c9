"""`decode/co-llm`: train the base + deferral head pair (or reuse it), choose eta on
validation with a scorer, decode the prompts; the method is `flywheel.decoders.co_llm`,
the parameters are `CoLLMParams` (`co_llm_params.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from prefect import task

from flywheel.decoders import co_llm as co_llm_module
from flywheel.decoders import stepping
from flywheel.decoders.co_llm import CoLLM, co_llm_decode, sweep_eta, train_co_llm
from flywheel.decoders.evaluation import sweep_table
from flywheel.decoders.stepping import CausalLM
from flywheel.flows.decode.co_llm_params import CoLLMParams
from flywheel.flows.decode.common import (
    ETA_SWEEP,
    WORLD_EXAMPLES,
    WORLD_VALIDATION,
    DecodeInputs,
    Written,
    alone_figures,
    common_fields,
    decode_and_write,
    output_accuracy,
    token_rows,
    writer_share,
)
from flywheel.flows.decode.inputs import (
    example_pairs,
    examples_dataset,
    read_prompts,
    shared_vocabulary,
)
from flywheel.flows.decode.rewards import read_reward_model, sweep_scorer
from flywheel.flows.outputs import write_once
from flywheel.flows.pair_training import code_hash
from flywheel.flows.tracking import (
    MODEL_CALLS,
    Deployment,
    FlowRun,
    earlier_model,
    length_figures,
    model_inputs,
    training_key,
)
from flywheel.llm import BackendSpec, model_fingerprint
from flywheel.store import DatasetRef, ModelRef, data_root, save_model_version

CO_LLM_SOURCE = code_hash(co_llm_module, stepping)
CO_LLM_SCHEMA = pa.schema(
    [*common_fields(), ("token_ids", pa.list_(pa.int64())), ("deferral_share", pa.float64())]
)


@dataclass(frozen=True)
class CoLLMInputs(DecodeInputs):
    """The prompts, the examples the pair trains on and the rows eta is swept on."""

    examples: DatasetRef
    validation: DatasetRef


@dataclass(frozen=True)
class EtaChoice:
    """The eta to decode with; after a sweep, its rows in the store and its results."""

    eta: float
    sweep: DatasetRef | None = None  # None: eta was given
    results: list[dict] | None = None


@task(name="check-inputs")
def check_co_llm_inputs(params: CoLLMParams) -> CoLLMInputs:
    """Before any weights load: folders, one vocabulary, eta, the three datasets."""
    pair = shared_vocabulary(
        ("base_model", params.base_model), ("assistant_model", params.assistant_model)
    )
    if params.eta is not None:
        co_llm_module.check_eta(params.eta)
    if params.assistant_backend is not None:
        params.assistant_backend.check()
    data = read_prompts(params, pair)
    if params.sweep_reward_model is not None:
        read_reward_model(params.sweep_reward_model, None, "sweep_reward_model")
    held_out = {r["prompt"] for r in data.rows}
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
    return CoLLMInputs(data.prompts, data.rows, examples, validation)


@task(name="train-co-llm")
def train_pair(params: CoLLMParams, data: CoLLMInputs, run_id: str) -> ModelRef:
    """Train the deferral head and the base; the same examples, settings, code and
    weights reuse the published version. The assistant's target log-probs are stored
    under `_work/co-llm-targets`, keyed by its weights, and survive a killed run."""
    assistant_fp = model_fingerprint(BackendSpec(model=params.assistant_model))
    sources = CO_LLM_SOURCE + assistant_fp  # retrained assistant weights retrain the pair
    key = training_key(params.training(), [data.examples], sources, params.base_model)
    if earlier := earlier_model(params.model_name, key):
        return earlier
    targets = data_root() / "_work" / "co-llm-targets" / f"{assistant_fp}.pt"

    def build(folder: Path) -> dict:
        model, stats = train_co_llm(
            CausalLM.load(params.base_model),
            CausalLM.load(params.assistant_model),
            example_pairs(data.examples),
            targets_path=targets,
            **params.train_kwargs(),
        )
        model.save(folder)
        return json.loads(json.dumps({**stats, "cache_key": key}, default=str))

    inputs = [
        data.examples,
        *model_inputs(BackendSpec(model=params.base_model)),
        *model_inputs(BackendSpec(model=params.assistant_model)),
    ]
    return save_model_version(
        params.model_name, build, kind="co-llm", produced_by=run_id, inputs=inputs
    )


@task(name="choose-eta", **MODEL_CALLS)
def choose_eta(params: CoLLMParams, model: ModelRef, data: CoLLMInputs, run_id: str) -> EtaChoice:
    """The given eta, or the sweep's best on the validation set (written to the store)."""
    if params.eta is not None:
        return EtaChoice(params.eta)
    pairs = example_pairs(data.validation)
    with params.assistant() as assistant:
        report = sweep_eta(
            CoLLM.load(model.path),
            assistant,
            [p for p, _ in pairs],
            [a for _, a in pairs],
            scorer=sweep_scorer(params.sweep_scorer, params.sweep_reward_model),
            etas=params.etas,
            max_new_tokens=params.max_new_tokens,
            batch_size=params.batch_size,
        )
    best = report["recommended_eta"]
    named = f"{model.name}@{model.version}"
    rows = [{"model": named, **r, "recommended": r["eta"] == best} for r in report["results"]]
    # one sweep per model version and sweep setting: a re-run reuses it
    version = params.sweep_version(model)
    sweep, _ = write_once(ETA_SWEEP, rows, version, run_id, [model, data.validation])
    return EtaChoice(best, sweep, report["results"])


@task(name="decode-co-llm", **MODEL_CALLS)
def decode_co_llm(
    params: CoLLMParams, model: ModelRef, data: CoLLMInputs, eta: float, run_id: str
) -> Written:
    pair = CoLLM.load(model.path)
    spec = params.assistant_backend or BackendSpec(model=params.assistant_model)
    key = [f"{model.name}@{model.version}", eta, model_fingerprint(spec), CO_LLM_SOURCE]
    with params.assistant() as assistant:

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

        return decode_and_write(
            params,
            data,
            run_id,
            method="co-llm",
            key=key,
            decode_chunk=decode_chunk,
            schema=CO_LLM_SCHEMA,
            lineage=[model, *model_inputs(spec)],
        )


def _sweep_markdown(params: CoLLMParams, chosen: EtaChoice, validation: DatasetRef) -> str:
    if chosen.sweep is None:
        return ""
    table = sweep_table(chosen.results or [], chosen.eta, params.sweep_scorer)
    return (
        f"## eta sweep on {validation.name}@{validation.version}\n\n{table}\n\n"
        f"Rows: dataset {chosen.sweep.name}@{chosen.sweep.version}."
    )


CO_LLM = Deployment("decode/co-llm", "Co-LLM decoding", CoLLMParams)


@CO_LLM.flow(check=check_co_llm_inputs)
def co_llm_flow(params: CoLLMParams, data: CoLLMInputs, run: FlowRun) -> dict:
    """Co-LLM: a base model that defers tokens to an assistant, eta chosen on validation."""
    model = train_pair(params, data, run.id)
    chosen = choose_eta(params, model, data, run.id)
    written = decode_co_llm(params, model, data, chosen.eta, run.id)
    rows = written.rows()
    figures = {
        "model": f"{model.name}@{model.version}",
        "reused earlier model": model.meta["produced_by"] != run.id,
        **written.figures(rows),
        "eta": chosen.eta,
        "eta chosen by": "the validation sweep" if params.eta is None else "the eta parameter",
        "accuracy": output_accuracy(rows),
        "share of tokens deferred": writer_share(rows, "assistant"),
        **length_figures({"train": model.meta["metrics"].get("length", {})}),
    }
    if params.baselines:
        alone = {"base alone": params.base_model, "assistant alone": params.assistant_model}
        figures |= alone_figures(data.rows, alone, params)
    run.summary(figures, _sweep_markdown(params, chosen, data.validation))
    return {"figures": figures, "sweep": chosen.results}
