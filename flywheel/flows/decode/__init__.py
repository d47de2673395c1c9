"""`decode/co-llm`, `decode/collab`, `decode/hybrid`: the collaborative decoders over a
store dataset of prompts, their outputs written back with lineage. Wiring only; the
methods are in `flywheel.decoders`.

Each run reads its prompts (by default `world_decode_prompts`, held-out world tasks
with their answers), checks every input before a model loads, decodes chunk by chunk
under a checkpoint (a killed run resumes where it stopped and writes each row once),
and, when the prompts carry answers, reports exact-match accuracy next to the
models alone on the same prompts.
"""

from flywheel.flows.decode.co_llm import CoLLMParams, co_llm_flow
from flywheel.flows.decode.collab import CollabParams, collab_flow
from flywheel.flows.decode.common import WORLD_PROMPTS, DecodeParams
from flywheel.flows.decode.hybrid import HybridParams, hybrid_flow

__all__ = [
    "WORLD_PROMPTS",
    "CoLLMParams",
    "CollabParams",
    "DecodeParams",
    "HybridParams",
    "co_llm_flow",
    "collab_flow",
    "hybrid_flow",
]
