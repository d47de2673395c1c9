"""Shared fixtures: a data folder per test, the world's models trained once per session,
and a Prefect test server once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.ports import free_port  # noqa: F401 (tests import it from here)

# The tests use Prefect settings of their own, never the developer's: run from the
# project root, prefect.toml would point Prefect at data/_prefect, whose profile holds
# the local server's auth string (which the test server would then demand).
_prefect_dir = Path(tempfile.mkdtemp(prefix="flywheel-test-prefect-"))
os.environ["PREFECT_HOME"] = str(_prefect_dir)
os.environ["PREFECT_PROFILES_PATH"] = str(_prefect_dir / "profiles.toml")
atexit.register(shutil.rmtree, _prefect_dir, ignore_errors=True)
# A shared lake the developer's shell points at is not the tests' (test_lake_servers
# sets these for its own servers).
for _variable in ("FLYWHEEL_LAKE_CATALOG", "FLYWHEEL_LAKE_DATA_PATH"):
    os.environ.pop(_variable, None)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh FLYWHEEL_DATA_DIR for one test."""
    path = tmp_path / "data"
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(path))
    return path


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> None:
    """One torch thread, as flows use by default (flywheel.llm.threads): on a busy 2-core
    machine two threads slow the tiny models down several times."""
    from flywheel.llm.threads import set_torch_threads

    set_torch_threads(1)


# The session's world models: a fixed number of steps, so they are the same models on a
# fast or a busy machine (seconds of training, not minutes). Floors off: brief training
# does not reach the defaults' accuracy floors, and the tests do not need it to.
TEST_BOOTSTRAP = dict(
    small_steps=200,
    large_steps=100,
    small_min_accuracy=0.0,
    large_min_accuracy=0.0,
    eval_tasks=60,
    # 600 steps: the agent acts badly, but it buys things, so ARMAP has triplets to make
    shop_agent_steps=600,
    shop_agent_eval_intents=20,
)


@pytest.fixture(scope="session")
def world_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """world-small, world-large and shop-agent, trained briefly and deterministically."""
    from flywheel.world.bootstrap import BootstrapConfig, bootstrap_models

    root = tmp_path_factory.mktemp("models")
    bootstrap_models(root, BootstrapConfig(**TEST_BOOTSTRAP))
    return root


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server (SQLite in a temp folder) for the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (the session default already; kept for modules that
    state it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
