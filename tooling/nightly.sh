#!/usr/bin/env bash
# The nightly hardware gate (docs/nightly.md): parity, decoded and accuracy gates in parallel with
# one xdist worker per device, then the benchmark pass alone, then the project's own slow tests. Reports go to $ZOO_REPORTS
# (default reports/nightly). Exit status: non-zero when any gate failed in either pass; a backend
# named in $ZOO_REQUIRE_BACKENDS (e.g. "om" on an NPU host; the plugin reads it as
# --require-backends) fails every gate it cannot serve, and the pass if it ran no gate at all.
#
#   tooling/nightly.sh --devices 0,1,2,3 [more pytest arguments, given to both passes]
set -uo pipefail
cd "$(dirname "$0")/.."
# One id for every pass of this invocation: the history report shows them together (README "Run history").
export ZOO_SESSION_ID="${ZOO_SESSION_ID:-nightly-$(date -u +%Y%m%dT%H%M%SZ)-$$}"
reports="${ZOO_REPORTS:-reports/nightly}"
mkdir -p "$reports"

devices=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) devices="$2"; shift 2 ;;
        --devices=*) devices="${1#--devices=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
device_args=()
workers="${ZOO_WORKERS:-2}"
if [ -n "$devices" ]; then
    device_args=(--devices "$devices")
    workers=$(tr ',' '\n' <<< "$devices" | grep -c .)
fi

status=0
.venv/bin/python -m pytest -n "$workers" tests/models -m "not benchmark" --nightly "${device_args[@]}" --fail-on-regression \
    --junitxml "$reports/parity.xml" --zoo-report "$reports/parity.json" "${args[@]}" || status=$?
.venv/bin/python -m pytest -p no:xdist tests/models -m benchmark --nightly "${device_args[@]}" --fail-on-regression \
    --junitxml "$reports/benchmark.xml" --zoo-report "$reports/benchmark.json" \
    --benchmark-json "$reports/benchmark-results.json" "${args[@]}" || status=$((status == 0 ? $? : status))
# The project's own nightly-tier tests (CI deselects them): the fleet on loopback servers, the
# exhaustive option and README matrices, the engine's AOTInductor compile, OM paths at more shapes.
.venv/bin/python -m pytest -n "${ZOO_WORKERS:-2}" tests/engine tests/reliability tests/coco -m slow --history none \
    --junitxml "$reports/selftest.xml" --zoo-report "$reports/selftest.json" || status=$((status == 0 ? $? : status))

exit "$status"
