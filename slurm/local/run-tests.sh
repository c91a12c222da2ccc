#!/usr/bin/env bash
# Start the local Slurm (up.sh), run the slurm-marked tests inside its network namespace, stop it (down.sh, always).
# Fails if any slurm test fails, is skipped, or none ran. Extra arguments go to pytest, e.g.
#   bash slurm/local/run-tests.sh tests/stages/test_slurm_cluster.py
#   bash slurm/local/run-tests.sh -k afterok -x
# Settings: SAEV_SLURM_DIR, SAEV_SLURM_NETNS (see up.sh); SAEV_SLURM_KEEP=1 leaves the cluster up afterwards.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."

# Sync the environment here, before anything enters the cluster's network namespace: inside it only loopback is
# reachable, so a first `uv run` there (a fresh clone, no .venv) cannot reach the package registry to build the
# project. Inside, `uv run --no-sync` uses the environment as synced and never tries the network.
uv sync --locked

DIR=$(realpath -m "${SAEV_SLURM_DIR:-/tmp/saev-slurm}")
NETNS=${SAEV_SLURM_NETNS:-saev-slurm}
export SAEV_SLURM_DIR=$DIR SAEV_SLURM_NETNS=$NETNS

# One run at a time per instance: a second run's down.sh would stop the cluster under the first one's tests.
mkdir -p "$DIR"
exec 9>"$DIR/run-tests.lock"
if ! flock -n 9; then
    echo "[slurm/local/run-tests] another run-tests.sh uses $DIR; waiting for it to finish"
    flock 9
fi
REPORT=$(mktemp --suffix=.xml)

cleanup() {
    local rc=$?
    if [ "${SAEV_SLURM_KEEP:-0}" = 1 ]; then
        echo "[slurm/local/run-tests] SAEV_SLURM_KEEP=1: cluster left up (bash $HERE/down.sh stops it)"
    else
        bash "$HERE/down.sh" 9>&- || true
    fi
    rm -f "$REPORT"
    exit "$rc"
}
trap cleanup EXIT

bash "$HERE/up.sh" 9>&-  # (fd 9, the lock, must not leak into the daemons)
# shellcheck source=/dev/null
source "$DIR/env.sh"  # SLURM_CONF for the clients (sbatch, sacct, ...) that submitit and the pipeline call

set +e
nsenter "--net=/run/netns/$NETNS" uv run --no-sync pytest -m slurm -p no:cacheprovider -rs --junitxml="$REPORT" "$@" 9>&-
status=$?
set -e

python3 - "$REPORT" "$status" <<'EOF'
import sys
import xml.etree.ElementTree as ET

report, status = sys.argv[1], int(sys.argv[2])
try:
    root = ET.parse(report).getroot()
except (OSError, ET.ParseError) as err:
    sys.exit(f"[slurm/local/run-tests] FAIL: no pytest report ({err}); pytest exit {status}")
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
summary = ", ".join(f"{v} {k}" for k, v in count.items())
if status != 0 or count["tests"] == 0 or count["failures"] or count["errors"] or count["skipped"]:
    why = "some slurm tests were skipped (every slurm test must run here)" if count["skipped"] else "see above"
    if count["tests"] == 0:
        why = "no slurm test ran"
    sys.exit(f"[slurm/local/run-tests] FAIL ({summary}; pytest exit {status}): {why}")
print(f"[slurm/local/run-tests] OK: {summary}")
EOF
