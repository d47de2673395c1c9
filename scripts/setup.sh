#!/usr/bin/env bash
# Create .venv and install Flywheel with its test and serving extras. Idempotent:
# re-installs only when pyproject.toml changed since the last successful install.
# A first install takes a few minutes and about 2 GB (torch's CPU wheel is most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
say() { echo "[setup $(date +%H:%M:%S)] $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
  say ".venv is up to date with pyproject.toml"
  exit 0
fi
say "installing Flywheel and its dependencies into .venv (torch==2.13.0 CPU wheel;" \
  "a first install takes a few minutes and about 2 GB)"
# one line per package as pip gets to it, so a long install shows where it is; pip's
# warnings about local index folders it cannot use are noise
if ! .venv/bin/pip install --progress-bar off -e '.[dev,serve]' 2>&1 |
  { grep -E "^(Collecting|Installing collected|Successfully installed|ERROR|error)" || true; } |
  cut -c1-200 | while IFS= read -r line; do say "$line"; done; then
  # pipefail: pip's own exit status decides
  say "the install failed; run: .venv/bin/pip install -e '.[dev,serve]' to see the whole log"
  exit 1
fi
rm -f .venv/.installed-*
touch "$stamp"
say "done: $(du -sh .venv | cut -f1) in .venv"
