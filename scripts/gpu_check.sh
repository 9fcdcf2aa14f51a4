#!/usr/bin/env bash
# On a bare GPU machine (the device tool's), from the repository root: every GPU measurement in one
# call, results under $OUT (docs/gpu-runbook.md). tokenfuse comes from this checkout, not installed.
#   bash scripts/gpu_check.sh            # the 8-minute run;  DEADLINE=300 bash scripts/gpu_check.sh  for less
#   bash scripts/gpu_check.sh --dry      # the CPU rehearsal (tests/test_gpu_check.py runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
link=$(mktemp -d)  # the checkout, importable as tokenfuse (its directory is the package)
ln -s "$PWD" "$link/tokenfuse"
export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
deadline=${DEADLINE:-480}
# the script keeps its own deadline; this outer bound only stops a hang (its results are already written)
timeout --kill-after=10 $((deadline + 30)) "${PYTHON:-python3}" scripts/gpu_check.py --out "$out" --deadline "$deadline" "$@"
status=$?
rm -rf "$link"
exit $status
