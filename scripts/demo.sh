#!/usr/bin/env bash
# The main job on the embedded default: set up, start a local Prefect server and the
# serve process, bootstrap the world's tiny models, run synth/reference by hand and
# query what it wrote. Leaves the server and the serve process running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
flywheel up
# fixed steps: minutes on 2 cores (longer on a busy machine, never weaker models)
if ! prefect deployment run world/bootstrap --watch; then
  echo "world/bootstrap failed; its log: data/_run/serve.log (or the run in the UI)" >&2
  exit 1
fi
prefect deployment run synth/reference --watch
echo
echo "== the world's models: held-out accuracy per family (flywheel world report) =="
flywheel world report
echo
echo "== what synth/reference wrote (flywheel sql) =="
flywheel sql "select family, count(*) as samples, round(avg(refined::int), 2) as refined_share
              from reference_synth group by 1 order by 1"
flywheel sql "select dataset, version, input_dataset from lineage order by recorded desc limit 5"
cat <<'MSG'

The Prefect server (UI: http://127.0.0.1:4200; its login is the auth string that
`flywheel server auth-string` prints) and the serve process are still running;
deployments run nightly. Logs: data/_run/server.log, data/_run/serve.log.
  stop both:       .venv/bin/flywheel down
  start again:     .venv/bin/flywheel up
  run by hand:     .venv/bin/prefect deployment run synth/reference --watch
  query:           .venv/bin/flywheel sql "select * from reference_synth limit 5"
                   .venv/bin/flywheel shell    (the duckdb CLI on the lake, read-only)
MSG
