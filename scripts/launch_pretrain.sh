#!/usr/bin/env bash
# Single-node pretraining: NPROC processes (one per GPU, or CPU processes on gloo) under torchrun.
#
#   scripts/launch_pretrain.sh NPROC CONFIG.yaml [pretrain options...]
#   scripts/launch_pretrain.sh 8 my.yaml --set parallel.tp=2 --set parallel.pp=2   # tp x pp x dp = 2 x 2 x 2
#   scripts/launch_pretrain.sh 4 my.yaml --set parallel.pp=4 --set train.micro_batches=8 --set parallel.pp_schedule=1f1b
#
# Everything after CONFIG goes to `gnnmegatron pretrain` (--set SECTION.KEY=VALUE, --resume ...).
# tp*pp*dp must equal NPROC (dp defaults to NPROC/(tp*pp)). Rerunning the same command resumes
# from the newest complete checkpoint (--resume auto), under this or any other layout.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC CONFIG.yaml [pretrain options...]" >&2
  exit 2
fi
NPROC=$1
CONFIG=$2
shift 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# one intra-op thread per process unless the caller says otherwise (NPROC processes share the cores)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m gnnmegatron.cli pretrain --config "$CONFIG" "$@"
