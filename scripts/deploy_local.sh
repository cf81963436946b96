#!/usr/bin/env bash
# Start a real Flower SuperLink and one SuperNode per hospital on 127.0.0.1 (TLS by default),
# run the app with `flwr run`, then stop every process it started (by process group).
#
#   scripts/deploy_local.sh --smoke --auth                 # seconds-long check of the stack
#   scripts/deploy_local.sh --nodes 3 --data-dir A --data-dir B --data-dir C \
#       --run-config "num-server-rounds=3 test-file='runs/x/test.csv'"
#
# All options: python -m kidneyscan.federated.deploy --help
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x $here/.venv/bin/python ]]; then py=$here/.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
# flwr launches flower-superexec etc. by name: the interpreter's bin must come first.
export PATH="$(dirname "$py"):$PATH"
exec "$py" -m kidneyscan.federated.deploy --app "$here" "$@"
