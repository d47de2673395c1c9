#!/usr/bin/env bash
# Set up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tests/test_lake_servers.py starts a PostgreSQL server of its own from Debian's
# packages: installed here when absent and this user may (else those tests are skipped)
if ! command -v pg_ctl >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing Debian's postgresql package for the shared-lake tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } ||
      echo "[test] postgresql could not be installed: tests/test_lake_servers.py will skip"
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# two workers, one per core of a CI machine; a test file stays on one worker, so its
# module fixtures (one Prefect stack, one trained model) are made once
.venv/bin/pytest -q -n "${FLYWHEEL_TEST_WORKERS:-2}" --dist loadfile "$@"
