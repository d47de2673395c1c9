"""How many threads torch uses for CPU work, chosen on purpose rather than left to torch.

Torch starts one thread per core. For the world's tiny models that is the wrong
choice on a shared machine: at load ~9 on 2 cores a world-small training step took
0.75 s with 2 threads and 0.10 s with 1, because the threads wait on each other.
So the default is one thread; `FLYWHEEL_TORCH_THREADS` sets another count, and 0
keeps torch's own default (one per core), which suits models larger than the world's.
"""

from __future__ import annotations

import os

ENV = "FLYWHEEL_TORCH_THREADS"
DEFAULT_THREADS = 1


def torch_threads() -> int:
    """The configured count: `$FLYWHEEL_TORCH_THREADS`, else 1; 0 means torch's default."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_THREADS
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"{ENV}={text!r}: give a whole number of threads (1 suits the world's tiny "
            "models; 0 keeps torch's default of one per core)"
        )
    return value


def set_torch_threads(threads: int | None = None) -> int:
    """Apply `threads` (default: `torch_threads()`) to torch; returns the count in use."""
    import torch

    wanted = torch_threads() if threads is None else threads
    if wanted > 0 and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()
