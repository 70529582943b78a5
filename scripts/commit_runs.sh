#!/usr/bin/env bash
# Stage the lifelong runs under runs/ (finished ones and the state of unfinished ones) consistently while
# `make runs` is writing them: each run's state.safetensors is staged before its step rows, and the
# runner appends a step's rows before it saves that step's state, so the staged rows always reach at
# least the staged state's step (resume cuts the extra rows off). Usage: scripts/commit_runs.sh "message"
set -euo pipefail
cd "$(dirname "$0")/.."
# a state file over 5 MB (LEMoE's experts after a few hundred steps) is left out: the run then restarts
# from its beginning in another clone rather than bloat the history
big=$(find runs -name state.safetensors -size +5M)
for f in $big; do echo "not committed (over 5 MB): $f" >&2; done
git add --all -- $(find runs -name state.safetensors -size -5M) 2>/dev/null || true
git add --all -- runs/
for f in $big; do git reset -q -- "$f"; done
# commit what was staged, in that order (a pathspec would re-read the files as they are now)
git commit -m "${1:-runs: lifelong runs so far}"
