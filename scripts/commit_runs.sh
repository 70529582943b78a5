#!/usr/bin/env bash
# Stage the lifelong runs under runs/ (finished ones and the state of unfinished ones) consistently while
# `make runs` is writing them: each run's state.safetensors is staged before its step rows, and the
# runner appends a step's rows before it saves that step's state, so the staged rows always reach at
# least the staged state's step (resume cuts the extra rows off). Usage: scripts/commit_runs.sh "message"
set -euo pipefail
cd "$(dirname "$0")/.."
git add --all -- 'runs/**/state.safetensors' 2>/dev/null || true
git add --all -- runs/
git commit -m "${1:-runs: lifelong runs so far}" -- runs/
