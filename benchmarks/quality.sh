#!/usr/bin/env bash
# Next-session quality on one dataset: prepare → SessionRec → SASRec-style → evaluate (+ baselines).
# Usage: benchmarks/quality.sh SOURCE [extra `data prepare` args...]
#   benchmarks/quality.sh taobao
#   benchmarks/quality.sh globo --max-users 20000
# Writes runs/quality/SOURCE/{data,artifacts,results.json}; prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
source="$1"; shift
sr=.venv/bin/sessionrec
out="runs/quality/${source}"
rm -rf "$out"
$sr data prepare --source "$source" --out "$out/data" "$@"
$sr train --data "$out/data" --registry "$out/artifacts" --model sessionrec --promote
$sr train --data "$out/data" --registry "$out/artifacts" --model sasrec
$sr evaluate --data "$out/data" --registry "$out/artifacts" --model current --model latest \
    --out "$out/results.json"
