#!/usr/bin/env bash
# The GPU check of the fused message-passing ops and the EGNN blocks, as one command for a machine with
# an NVIDIA GPU whose Python already has torch and triton (nothing is downloaded):
#
#   bash scripts/gpu_check.sh [OUTDIR]        # default OUTDIR: gpu_check
#
# Steps, in order of what they settle, each under its own time limit, the whole under
# GPU_CHECK_BUDGET_S seconds (default 540): a step that would start with less than its limit left
# is skipped, and the log says so.
#   1. environment: nvidia-smi, python, torch, triton
#   2. the package, installed editable without its dependencies (torch and triton are the machine's;
#      the GPU checks import neither megatron-core nor zarr)
#   3. `gnnmegatron doctor --quick` on cuda: every op's triton and torch backends against the float64
#      reference, float32 and bfloat16, first and second order, deterministic mode bit-identical
#   4. benchmarks/egnn_blocks.py --device cuda: faithful unfused vs fused, first-order and conservative
#      steps, hidden 1024, 512 and 256 on 8000 atoms x 30 neighbours, one round of five timed steps
#      (12 processes, each autotuning afresh)
#   5. the doctor at its medium shape too
#   6. benchmarks/kernels.py --device cuda --quick (the node_split fused op against its baselines)
# Writes five files to OUTDIR: gpu_check.log (everything printed), doctor-small.json and
# doctor-medium.json (rewritten after every row, so a run stopped part-way keeps its rows),
# egnn_blocks-rows.jsonl (the benchmark's finished row groups) and benchmarks.tar.gz (this run's
# benchmark JSON/CSV/PNG, which also land in benchmarks/results/ under the GPU's name). Exit status: 1
# if a step failed, 3 if one was skipped for time, 2 without a CUDA device, else 0.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${1:-gpu_check}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$OUTDIR" || exit 1
OUTDIR="$(cd "$OUTDIR" && pwd)"  # relative to the caller's directory
cd "$ROOT" || exit 1
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
STATUS=0

say() { echo "== $* ($(date -u +%H:%M:%S), ${SECONDS}s)" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout LIMIT_S` unless the budget has less left.
step() {
  local name=$1 limit=$2
  shift 2
  if (( SECONDS + limit > BUDGET )); then
    say "SKIP $name: needs up to ${limit}s, $((BUDGET - SECONDS))s of the ${BUDGET}s budget left"
    (( STATUS == 0 )) && STATUS=3
    return
  fi
  say "START $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if (( rc != 0 )); then
    say "FAIL $name: exit status $rc$( (( rc == 124 )) && echo ', over its time limit')"
    STATUS=1
  else
    say "DONE $name"
  fi
}

say "gnnmegatron GPU check in $ROOT, results in $OUTDIR, budget ${BUDGET}s"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1; then
  say "no CUDA device visible to $PYTHON: nothing to check (this script is for a GPU machine)"
  exit 2
fi
STAMP="$(mktemp)"
step environment 60 bash -c "nvidia-smi; $PYTHON -c 'import sys, torch, triton; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); \
print(\"triton\", triton.__version__); print(torch.cuda.get_device_name())'"
if ! "$PYTHON" -c "import gnnmegatron.kernels" > /dev/null 2>&1; then
  # setup.py's python_requires names the Python versions CI tests; a GPU machine's may be newer
  step install 180 "$PYTHON" -m pip install -q --no-deps --no-build-isolation --ignore-requires-python -e "$ROOT"
fi
DOCTOR="import sys; from gnnmegatron import doctor; \
sys.exit(doctor.main(quick=QUICK, devices=['cuda'], json_path=sys.argv[1]))"
step "doctor (small shapes)" 240 "$PYTHON" -c "${DOCTOR/QUICK/True}" "$OUTDIR/doctor-small.json"
# finished (hidden, step) groups go to the rows cache at once: a rerun after a timeout resumes there
step "egnn_blocks (faithful, hidden 1024/512/256)" 330 "$PYTHON" benchmarks/egnn_blocks.py --device cuda \
  --variants faithful-unfused,faithful-fused --hidden 1024,512,256 --rounds 1 --repeats 5 --timeout 240 \
  --rows-cache "$OUTDIR/egnn_blocks-rows.jsonl"
step "doctor (small and medium shapes)" 180 "$PYTHON" -c "${DOCTOR/QUICK/False}" "$OUTDIR/doctor-medium.json"
step "kernels (quick)" 180 "$PYTHON" benchmarks/kernels.py --device cuda --quick
# this run's benchmark files only: newer than the stamp made at the start
LIST="$(mktemp)"
find benchmarks/results -maxdepth 1 -type f -newer "$STAMP" -printf '%f\n' > "$LIST"
if [[ -s "$LIST" ]]; then tar -czf "$OUTDIR/benchmarks.tar.gz" -C benchmarks/results -T "$LIST"; fi
rm -f "$STAMP" "$LIST"
say "finished with status $STATUS; files: $(ls "$OUTDIR" | tr '\n' ' ')"
exit "$STATUS"
