"""Torch's thread count is chosen on purpose: one by default, a setting otherwise, and
every flow run applies it."""

from __future__ import annotations

import pytest
import torch

from flywheel.flows.tracking import tracked_run
from flywheel.llm.threads import ENV, set_torch_threads, torch_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_thread_by_default_and_the_setting_otherwise(monkeypatch, restore_threads) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert torch_threads() == 1
    monkeypatch.setenv(ENV, "2")
    assert set_torch_threads() == 2 == torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv(ENV, "0")  # torch's own default: left as it is
    assert set_torch_threads() == 1
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=f"{ENV}=.*whole number"):
            torch_threads()


def test_a_tracked_run_applies_the_setting(monkeypatch, data_dir, restore_threads) -> None:
    torch.set_num_threads(1)
    monkeypatch.setenv(ENV, "2")
    with tracked_run("test/threads", {}):
        assert torch.get_num_threads() == 2
