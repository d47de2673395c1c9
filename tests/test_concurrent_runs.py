"""Two identical runs started at once (a schedule plus a manual run) do the work once and
write one version of each output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from flywheel.flows.synth import ReferenceSynthParams
from flywheel.llm import BackendSpec
from flywheel.store import list_versions

RUN = """
import json, sys
from flywheel.flows.synth import ReferenceSynthParams, reference
reference(ReferenceSynthParams.model_validate(json.loads(sys.argv[1])))
"""


def test_two_identical_synth_runs_at_once_do_the_work_once(
    prefect_api, world_models: Path, data_dir: Path
) -> None:
    params = ReferenceSynthParams(
        responder=BackendSpec(model=str(world_models / "world-large")),
        n_references=12,
        samples_per_feature=4,
        chunk_size=4,
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "FLYWHEEL_DATA_DIR": str(data_dir),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "flywheel",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, params.model_dump_json()],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(log[-3000:] for log in logs)

    # one version of every dataset the runs wrote, the generated references included
    for name in ("world_references", "reference_synth", "reference_synth_feedback"):
        assert len(list_versions(name)) == 1, name
    assert len(list_versions("reference_synth__failed")) == 1
    # every chunk of every stage computed by one of the two runs only
    workdirs = list((data_dir / "_work" / "refed").iterdir())
    assert len(workdirs) == 1
    done = re.findall(r"(\w+): chunk (\d+) of \d+ done", "\n".join(logs))
    chunk_files = sorted(workdirs[0].glob("*/chunk-*.json"))
    assert len(done) == len(set(done)) == len(chunk_files) > 3
