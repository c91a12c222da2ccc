#!/usr/bin/env bash
# Start the local Slurm, run the slurm-marked tests inside its network namespace, stop it.
# Fails if any slurm test fails, is skipped, or none ran.
set -euo pipefail
cd "$(dirname "$0")/../.."

NETNS=${SAEV_SLURM_NETNS:-saev-slurm}
REPORT=$(mktemp --suffix=.xml)
trap 'bash slurm/local/down.sh; rm -f "$REPORT"' EXIT

bash slurm/local/up.sh
set +e
nsenter "--net=/run/netns/$NETNS" uv run pytest -m slurm -p no:cacheprovider -rs --junitxml="$REPORT" "$@"
status=$?
set -e
if [ "$status" -ne 0 ]; then
    echo "slurm tests failed (pytest exit $status)"
    exit "$status"
fi
python3 - "$REPORT" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
if tests == 0 or skipped:
    sys.exit(f"slurm tests: {tests} ran, {skipped} skipped; every slurm test must run")
print(f"slurm tests: {tests} ran, none skipped")
EOF
