"""What every benchmark shares: arguments, a temporary data folder, the world's tiny
models, the environment it ran in, a markdown table, and the results JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SIZES = ("small", "large")


def make_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores"
    )
    parser.add_argument(
        "--models",
        type=Path,
        help="an existing models folder holding world-small and world-large (e.g. data/_models); "
        "default: bootstrap them into the temporary data folder (about 3 minutes)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the data folder to use (FLYWHEEL_DATA_DIR); default: a temporary folder, "
        "deleted afterwards",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads "
        "slow the tiny models down by an order of magnitude)",
    )
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/)")
    return parser


@contextlib.contextmanager
def bench_env(args: argparse.Namespace) -> Iterator[Path]:
    """Point FLYWHEEL_DATA_DIR and PREFECT_HOME at the benchmark's own data folder.

    The project's `data/` is never touched; a temporary folder is removed at the end.
    """
    import torch
    from transformers.utils import logging as hf_logging

    tmp = None
    if args.data_dir is not None:
        data = args.data_dir.absolute()
        data.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="flywheel-bench-")
        data = Path(tmp)
    saved = {k: os.environ.get(k) for k in ("FLYWHEEL_DATA_DIR", "PREFECT_HOME")}
    os.environ["FLYWHEEL_DATA_DIR"] = str(data)
    os.environ["PREFECT_HOME"] = str(data / "_prefect")
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    try:
        yield data
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def world_models(args: argparse.Namespace, data: Path) -> dict[str, Path]:
    """Folders of world-small and world-large: `--models`, else bootstrapped into `data`."""
    from flywheel.world.bootstrap import BootstrapConfig, bootstrap_models, model_dir

    if args.models is not None:
        root = args.models.absolute()
    else:
        root = data / "_models"
        print(f"bootstrapping the world's tiny models into {root} (about 3 minutes)...")
        bootstrap_models(root, BootstrapConfig())
    paths = {size: model_dir(root, size) for size in SIZES}
    for path in paths.values():
        if not (path / "config.json").exists():
            raise SystemExit(
                f"{path} holds no model; run `flywheel world bootstrap` or drop --models"
            )
    return paths


def model_info(paths: dict[str, Path]) -> dict[str, Any]:
    """Each model's path, parameter count and bootstrap accuracy, from its report."""
    info: dict[str, Any] = {}
    for size, path in paths.items():
        report_file = path / "bootstrap_report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
        info[size] = {
            "path": str(path),
            "parameters": report.get("parameters"),
            "bootstrap_config": report.get("config"),
            "bootstrap_accuracy": report.get("accuracy", {}).get("all"),
        }
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*argv: str) -> str | None:
    try:
        out = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Command line, date, package versions, device and code version of this run."""
    import torch

    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    versions = {}
    for package in ("torch", "transformers", "prefect", "flywheel"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    dev: dict[str, Any] = {
        "kind": device,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        dev["gpu"] = torch.cuda.get_device_name(device)
    status = _git("status", "--porcelain", "--", "flywheel")
    return {
        "command": shlex.join([str(python), *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "device": dev,
        "git_commit": _git("rev-parse", "HEAD"),
        "flywheel_modified_since_commit": bool(status) if status is not None else None,
    }


def write_results(
    name: str, args: argparse.Namespace, seeds: Sequence[int], figures: dict[str, Any], device: str
) -> Path:
    """Write `benchmarks/results/<name>.json` (or --out): figures plus how they were made."""
    path = args.out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        **environment(device),
        "quick": args.quick,
        "seeds": list(seeds),
        "figures": figures,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with 3 significant decimals."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0
