#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run of at most 8 minutes (--budget) on one H200. Writes into
# $OUT (default ./gpu-out): env.txt, layer.{txt,json}, train_step.{txt,json}, preset_gpu/ (metrics of a short
# `--preset gpu` run), chapters/ (every chapter executed on the GPU), summary.txt (each step's status and time).
#
#   bash benchmarks/gpu.sh                        # on a CUDA machine, from the repository root
#   bash benchmarks/gpu.sh --sweeps experts       # also the GPU size of these experiments (comma-separated)
#   bash benchmarks/gpu.sh --budget 300           # the whole run in at most 300 s
#   bash benchmarks/gpu.sh --overwrite            # write into a non-empty $OUT (refused without it)
#   bash benchmarks/gpu.sh --device cpu --quick   # the same steps at toy sizes on the CPU (CI runs this)
#
# It needs only torch (+ matplotlib/pandas for the chapters, transformers for the HF peer) and runs switch_core
# from this checkout (PYTHONPATH), so it works on a machine with no project install and no network. The data:
# $SWITCH_CORE_DATA, else ./shared/data, else ../shared/data (tinyshakespeare/input.txt).
#
# The budget (default 480 s, plus 480 s per sweep) bounds the whole run: each step runs under the smaller of its
# own time limit and the time left, in order of importance (layer, model step, training run, chapters, compiled
# model step, sweeps); a step that finds under 10 s left is skipped (rc=skip). Any failed, timed-out or skipped
# step makes the exit status 1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
device=cuda quick=0 sweeps="" budget="" overwrite=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --sweeps) sweeps="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --overwrite) overwrite=1; shift ;;
    *) echo "error: unknown argument $1 (expected --device cpu|cuda, --quick, --sweeps NAMES, --budget SECONDS," \
            "--overwrite)" >&2
       exit 2 ;;
  esac
done
case "$device" in cpu|cuda) ;; *) echo "error: --device must be cpu or cuda, got $device" >&2; exit 2 ;; esac
IFS=',' read -r -a names <<< "$sweeps"
if [ -z "$budget" ]; then
  budget=480
  for name in "${names[@]}"; do [ -n "$name" ] && budget=$((budget + 480)); done
elif ! [[ "$budget" =~ ^[0-9]+$ ]] || [ "$budget" -lt 1 ]; then
  echo "error: --budget must be a whole number of seconds >= 1, got $budget" >&2; exit 2
fi
start=$SECONDS deadline=$((SECONDS + budget))
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-$PWD/gpu-out}
if [ "$overwrite" -eq 0 ] && [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "error: OUT=$OUT is not empty (an earlier run's results?); set OUT to a new folder or pass --overwrite" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${SWITCH_CORE_DATA:-}" ]; then
  for d in "$PWD/shared/data" "$PWD/../shared/data"; do
    if [ -f "$d/tinyshakespeare/input.txt" ]; then export SWITCH_CORE_DATA="$d"; break; fi
  done
fi
: > "$OUT/summary.txt"
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.txt, record status and wall time
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc=0 left=$((deadline - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "skipped: ${left}s of the ${budget}s budget left" > "$OUT/$name.txt"
    rc=skip
  else
    timeout -k 5 "$limit" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
  fi
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || failed=1
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || echo "git: unknown commit"
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version());
print('cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "SWITCH_CORE_DATA=${SWITCH_CORE_DATA:-unset}"
  "$PY" -c "import importlib.util as u; print('peers:', {m: bool(u.find_spec(m)) for m in
('transformers', 'megablocks', 'torchtitan', 'labml_nn')})"
} > "$OUT/env.txt" 2>&1

if [ "$quick" -eq 1 ]; then
  step layer 120 "$PY" benchmarks/bench_layer.py --device "$device" --quick --experts 4,8 --json "$OUT/layer.json"
  step train_step 120 "$PY" benchmarks/bench_train.py --device "$device" --configs tiny --rounds 2 \
    --steps-per-round 1 --json "$OUT/train_step.json"
  step preset_gpu 120 "$PY" -m switch_core.train --preset tiny --device "$device" --steps 10 --no-progress \
    --out "$OUT/preset_gpu" --overwrite
  step chapters 300 "$PY" benchmarks/run_chapters.py --out "$OUT/chapters" book/routing.md
else
  step layer 150 "$PY" benchmarks/bench_layer.py --device "$device" --experts 8,16,32,64 --json "$OUT/layer.json"
  step train_step 90 "$PY" benchmarks/bench_train.py --device "$device" --json "$OUT/train_step.json"
  step preset_gpu 90 "$PY" -m switch_core.train --preset gpu --device "$device" --steps 300 --eval-interval 100 \
    --no-progress --out "$OUT/preset_gpu" --overwrite
  step chapters 300 "$PY" benchmarks/run_chapters.py --out "$OUT/chapters"  # summary.json: those done
  step train_compiled 90 "$PY" benchmarks/bench_train.py --device "$device" --compile --no-peers --rounds 5 \
    --json "$OUT/train_step_compiled.json"  # last: does --compile pay on the GPU?
fi
rm -f "$OUT"/preset_gpu/checkpoint*.pt  # results only: no checkpoints come back

for name in "${names[@]}"; do
  [ -n "$name" ] || continue
  extra=()
  [ "$quick" -eq 1 ] && extra=(--steps 5 --seeds 1)
  step "sweep-$name" 480 "$PY" -m switch_core.sweep "$name" --device "$device" --runs "/tmp/gpu-sweeps/$name" \
    --results "$OUT/book_data" --overwrite --no-progress "${extra[@]}"
done
echo "budget ${budget}s, used $((SECONDS - start))s" >> "$OUT/summary.txt"
echo "results in $OUT (summary.txt)"
exit "$failed"
