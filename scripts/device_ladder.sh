#!/usr/bin/env bash
# The width ladder on a lent GPU (issue 32), in one call of the device tool:
#
#     run(command="bash scripts/device_ladder.sh 470", timeout_s=590)
#
# trains the rungs named in LADDER_RUNGS (default: tier 2's three heavy-world rungs), side by side on the
# one GPU, one process each, for SECONDS (default 470) and sends back what they made: a finished rung's folder
# (weights, tokenizer, config, training.json) as <rung>.tar.gz, an unfinished one's resumable checkpoint as
# <rung>.ckpt.tar.gz (split into parts below the tool's 16 MiB per file). Each rung goes on from the checkpoint
# committed under organisms/<rung>/ when there is one (a run resumed on another device goes on from the same
# state; training.json's history names each epoch's device). Back here:
#
#     bash scripts/device_ladder.sh --unpack /work/.device/<files_at>   # into organisms/, then commit them
#
# The tool sends the working tree, at most 64 MiB; this repository's tracked files are about 99 MB (runs/, book/,
# organisms/), so a call needs a slimmer checkout holding wilke_lib/, scripts/, pyproject.toml and the rungs'
# organisms/ folders (a sparse checkout; not tried yet: no session has been lent a GPU since the tree grew).
# The machine's python3 already holds torch, transformers, tokenizers, safetensors, pandas, pyyaml and tqdm
# (/work/.library/device/KINDS.md); the repository is put on PYTHONPATH, nothing is installed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${1:-}" = "--unpack" ]; then
    from="${2:?the folder the device tool copied the files to}"
    for archive in "$from"/*.tar.gz; do
        [ -e "$archive" ] || continue
        echo "unpacking $(basename "$archive")"; tar -xzf "$archive" -C organisms
    done
    for first in "$from"/*.ckpt.tar.gz.part00; do
        [ -e "$first" ] || continue
        echo "unpacking $(basename "${first%.part00}")"; cat "${first%.part00}".part* | tar -xzf - -C organisms
    done
    exit 0
fi

SECONDS_BUDGET="${1:-470}"
RUNGS="${LADDER_RUNGS:-toy-gpt2-x4-w192 toy-gpt2-x4-w96 toy-gpt2-x4-w384}"
OUT="${OUT:-/tmp/device_ladder_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

# every epoch ends with a checkpoint: stop starting epochs a minute before the budget, so the packing fits
budget=$((SECONDS_BUDGET - 60))
pids=""
for rung in $RUNGS; do
    OMP_NUM_THREADS=3 "$PY" -m wilke_lib.organisms train --name "$rung" --threads 3 --time-budget "$budget" \
        >"$OUT/$rung.log" 2>&1 &
    pids="$pids $!"
done
for pid in $pids; do wait "$pid"; done

for rung in $RUNGS; do
    folder="organisms/$rung"
    if [ -f "$folder/config.json" ]; then
        tar -czf "$OUT/$rung.tar.gz" -C organisms --exclude training-checkpoint.pt "$rung"
    elif [ -f "$folder/training-checkpoint.pt" ]; then
        tar -czf - -C organisms "$rung/training-checkpoint.pt" | split -b 15m -d - "$OUT/$rung.ckpt.tar.gz.part"
    fi
    tail -c 400 "$OUT/$rung.log" | tr '\r' '\n' | tail -n 2
done
# the tool returns at most 8 files: the logs go back as one
tail -n 5 "$OUT"/*.log > "$OUT/logs.txt" 2>/dev/null; rm -f "$OUT"/*.log
ls -la "$OUT"
