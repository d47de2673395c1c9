"""Kill test of `synth/reference` on the lake store: rows lost or duplicated after a
`kill -9` at several points of a run and a re-run, against an uninterrupted run.

One uninterrupted run (its own data folder) gives the expected rows and its wall time T.
Then, for each kill point f (fractions of T), a fresh data folder: the flow starts in a
subprocess, gets SIGKILL after f * T seconds, and is run again to the end with the same
parameters. Its three datasets (`<output>`, `<output>_feedback`, `<output>__failed`) are
compared with the uninterrupted run's, row by row (by id; the instruction, response and
initial response of each sample): rows lost, duplicated, changed, and how many versions
each dataset has (a resumed run reuses its planned versions: 1). Target: 0, 0, 0 and 1
at every point. The Prefect server is Prefect's test harness, shared by all runs.

    .venv/bin/python benchmarks/synth_kill.py --quick --models data/_models
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import make_parser, table, world_models, write_results

RUN = r"""
import json, sys
from flywheel.flows.synth import ReferenceSynthParams, reference
reference(ReferenceSynthParams.model_validate(json.loads(sys.argv[1])))
"""

READ = r"""
import json
from flywheel.store import list_versions, read_dataset
out = {}
for kind, name in (("samples", "kill_synth"), ("feedback", "kill_synth_feedback"),
                   ("failed", "kill_synth__failed")):
    versions = list_versions(name)
    rows = read_dataset(name).to_pandas() if versions else None
    keep = ["id", "instruction", "response", "initial_response"] if kind == "samples" else None
    out[kind] = {
        "versions": len(versions),
        "rows": [] if rows is None else json.loads(
            (rows[keep] if keep else rows).to_json(orient="records")
        ),
    }
print(json.dumps(out))
"""


def _run(env: dict[str, str], params_json: str, kill_after: float | None = None) -> bool:
    """Run the flow to its end, or SIGKILL it after `kill_after` seconds; whether it
    was killed (False: it ended first)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, params_json],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    if proc.returncode != 0:
        raise SystemExit(f"synth/reference failed:\n{err[-4000:]}")
    return False


def _stage(data: Path, env: dict[str, str]) -> str:
    """How far a killed run got: its checkpointed response chunks, the datasets written."""
    chunks = len(list((data / "_work").glob("refed/*/responses/chunk-*.json")))
    written = [kind for kind, d in _read(env).items() if d["versions"]] if chunks else []
    return f"{chunks} chunks, written: {','.join(written) or 'none'}"


def _read(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", READ], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"reading the datasets failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def _compare(want: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind in want:
        w, g = want[kind]["rows"], got[kind]["rows"]
        if kind == "samples":  # by id: the same sample, the same texts
            w_by = {r["id"]: r for r in w}
            g_ids = [r["id"] for r in g]
            lost = len(set(w_by) - set(g_ids))
            duplicated = len(g_ids) - len(set(g_ids))
            changed = sum(1 for r in g if r["id"] in w_by and r != w_by[r["id"]])
            extra = len(set(g_ids) - set(w_by))
        else:  # no ids: as multisets of rows
            w_rows = sorted(json.dumps(r, sort_keys=True) for r in w)
            g_rows = sorted(json.dumps(r, sort_keys=True) for r in g)
            lost = sum(1 for r in set(w_rows) if g_rows.count(r) < w_rows.count(r))
            duplicated = len(g_rows) - len(set(g_rows)) - (len(w_rows) - len(set(w_rows)))
            changed, extra = 0, len(set(g_rows) - set(w_rows))
        result[kind] = {
            "rows": len(g),
            "expected rows": len(w),
            "lost": lost,
            "duplicated": duplicated,
            "changed": changed,
            "unexpected": extra,
            "versions": got[kind]["versions"],
        }
    return result


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--points", default="0.4,0.6,0.8,0.9,0.95,0.98")
    args = parser.parse_args()
    points = [float(p) for p in args.points.split(",")]
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    from flywheel.flows.synth import ReferenceSynthParams
    from flywheel.llm.spec import BackendSpec

    work = Path(tempfile.mkdtemp(prefix="flywheel-kill-"))
    models = world_models(args, work / "bootstrap")
    n, per_feature = (24, 6) if args.quick else (60, 10)
    params = ReferenceSynthParams(
        responder=BackendSpec(model=str(models["large"])),
        n_references=n,
        samples_per_feature=per_feature,
        chunk_size=4,
        output="kill_synth",
    ).model_dump_json()
    with prefect_test_harness(server_startup_timeout=120):
        api = str(get_current_settings().api.url)

        def env_for(folder: Path) -> dict[str, str]:
            return {
                **os.environ,
                "PREFECT_API_URL": api,
                "FLYWHEEL_DATA_DIR": str(folder),
                "OMP_NUM_THREADS": str(args.threads),
            }

        clean = env_for(work / "clean")
        start = time.monotonic()
        _run(clean, params)
        seconds = time.monotonic() - start
        want = _read(clean)
        print(f"uninterrupted run: {seconds:.1f} s, {len(want['samples']['rows'])} samples")
        rows = []
        results: dict[str, Any] = {"uninterrupted seconds": seconds, "points": {}}
        for point in points:
            data = work / f"killed-{point}"
            env = env_for(data)
            killed = _run(env, params, kill_after=point * seconds)
            stage = _stage(data, env) if killed else "ended before the kill"
            _run(env, params)
            compared = _compare(want, _read(env))
            results["points"][str(point)] = {"killed": killed, "stage": stage, **compared}
            for kind, c in compared.items():
                rows.append(
                    [point, stage, kind, c["rows"], c["expected rows"], c["lost"],
                     c["duplicated"], c["changed"], c["unexpected"], c["versions"]]
                )  # fmt: skip
            print(f"kill at {point} x T: {stage}")
    print(
        table(
            ["kill at (x T)", "the killed run had", "dataset", "rows", "expected", "lost",
             "duplicated", "changed", "unexpected", "versions"],
            rows,
        )
    )  # fmt: skip
    ok = all(
        c["lost"] == c["duplicated"] == c["changed"] == c["unexpected"] == 0 and c["versions"] == 1
        for p in results["points"].values()
        for kind, c in p.items()
        if isinstance(c, dict)
    )
    results["target met"] = ok
    write_results("synth_kill", args, [], results, "cpu")
    shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
