#!/usr/bin/env bash
# Create .venv and install Flywheel with its test and serving extras. Idempotent:
# re-installs only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing Flywheel and its dependencies into .venv (torch==2.13.0, CPU wheel)"
  # pip warns about local index folders it cannot use; those lines are noise
  .venv/bin/pip install -q -e '.[dev,serve]' 2>&1 | { grep -v "^WARNING: Location" || true; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
