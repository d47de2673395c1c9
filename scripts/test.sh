#!/usr/bin/env bash
# Set up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# two workers, one per core of a CI machine; a test file stays on one worker, so its
# module fixtures (one Prefect stack, one trained model) are made once
.venv/bin/pytest -q -n "${FLYWHEEL_TEST_WORKERS:-2}" --dist loadfile "$@"
