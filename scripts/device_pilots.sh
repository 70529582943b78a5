#!/usr/bin/env bash
# Rounds 13-15 of the organism pilots (docs/organisms.md, issue 12) on the GPU machine of the `device` tool,
# in one call:   run(command="bash scripts/device_pilots.sh", timeout_s=590)
#
# Trains pilots of scripts/organism_pilots.py side by side on the one GPU, each cut off after
# PILOT_SECONDS, then traces where each keeps its facts. Under $OUT, one archive per pilot (its log,
# training.json, pilot.json, and its weights and tokenizer when they are small enough to come back)
# and summary.txt: at most 8 files, as the device tool returns them. Unpack here with
#   for f in FILES_AT/*.tar.gz; do tar -xzf "$f" -C /tmp/pilots; done
# A dry run of the whole pipeline on this CPU, in seconds: SMOKE=1 PILOTS=gpu-deep12-pressure bash scripts/device_pilots.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_pilots}
PILOT_SECONDS=${PILOT_SECONDS:-500}
# the 12-layer designs without the first MLPs passed every target on the CPU after 160 epochs (round 15,
# organisms/candidates/): their 24-layer version to the end of its schedule, and round 13's deepest and widest
PILOTS=${PILOTS:-"gptj24-pressure-attn4 gpu-deep24-gptj-pressure gpu-deep48-pressure gpu-deep24"}
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
SMOKE_FLAG=""; [ -n "${SMOKE:-}" ] && SMOKE_FLAG="--smoke"
WORK=$(mktemp -d /tmp/pilots.XXXX)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
n=$(echo $PILOTS | wc -w)
threads=$(( $(nproc) / n )); [ "$threads" -lt 1 ] && threads=1
{ date; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  echo "pilots: $PILOTS; $threads threads each; cut off after $PILOT_SECONDS s"; } | tee "$OUT/summary.txt"

for name in $PILOTS; do
  mkdir -p "$WORK/$name"
  # training gets what is left after about 100 s of loading, probing and tracing
  timeout "$PILOT_SECONDS" "$PY" scripts/organism_pilots.py "$name" --out "$WORK" --threads "$threads" $SMOKE_FLAG \
    --train-seconds $(( PILOT_SECONDS - 120 )) \
    > "$WORK/$name/pilot.log" 2>&1 &
done
wait

for name in $PILOTS; do
  dir="$WORK/$name"
  # the weights come back only if the archive stays under the tool's 16 MiB per file
  skip=(); [ -f "$dir/model.safetensors" ] && [ "$(stat -c %s "$dir/model.safetensors")" -gt 14000000 ] && skip=(--exclude model.safetensors)
  tar -czf "$OUT/$name.tar.gz" "${skip[@]}" --exclude training-checkpoint.pt -C "$WORK" "$name"
  { echo "== $name"; grep -v -E "it/s\]|step/s\]|s/step\]|Warning|warn\(|nanmean" "$dir/pilot.log" | tr '\r' '\n' | grep -v "^training " | tail -n 30; } >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
