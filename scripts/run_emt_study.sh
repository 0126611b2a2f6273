#!/usr/bin/env bash
# The EMT scaling-law study end to end: sweep (12 runs, resumable) -> fit -> report -> benchmark JSON.
#
#   scripts/run_emt_study.sh [SWEEP_YAML]          (default gnnmegatron/configs/scaling_emt.yaml)
#
# Environment: PYTHON (default .venv/bin/python, else python), N_BOOT (bootstrap resamples, 200),
# MACHINE (label of the summary file, cpu2), KEEP_CHECKPOINTS=1 keeps the finished runs' checkpoints
# (by default they are deleted once a run's record.json exists: a finished run is never resumed).
# Rerunning the script skips finished runs and resumes an interrupted one from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
CONFIG=${1:-gnnmegatron/configs/scaling_emt.yaml}
N_BOOT=${N_BOOT:-200}
MACHINE=${MACHINE:-cpu2}
read -r OUT D_KEY < <("$PY" -c "import sys; from gnnmegatron.scaling.sweep import load_sweep_config as l; c = l(sys.argv[1]); print(c.out_dir, c.fit_d_key)" "$CONFIG")
[ -n "$OUT" ] && [ -n "$D_KEY" ] || { echo "cannot read the sweep config $CONFIG" >&2; exit 1; }
start=$(date +%s)

echo "== sweep ($CONFIG -> $OUT)"
"$PY" -m gnnmegatron.scaling.sweep "$CONFIG"

echo "== fit"
"$PY" -m gnnmegatron.cli scaling fit "$OUT/runs.jsonl" --out "$OUT/fits.json" --n-boot "$N_BOOT" --d-key "$D_KEY"

echo "== report"
"$PY" -m gnnmegatron.cli scaling report "$OUT/runs.jsonl" --fits "$OUT/fits.json" --out-dir "$OUT" \
    --title "Scaling laws of an EGNN on the embedded EMT dataset (2-core CPU study)"

if [ "${KEEP_CHECKPOINTS:-0}" != 1 ]; then
    for rec in "$OUT"/runs/*/record.json; do rm -rf "$(dirname "$rec")/checkpoints"; done
fi

wall=$(( $(date +%s) - start ))
echo "== summary ($wall s)"
"$PY" - "$OUT" "$MACHINE" "$wall" "$0 $*" <<'PYEOF'
import csv, json, sys
from pathlib import Path
from gnnmegatron.scaling.fit import load_records
from gnnmegatron.scaling.sweep import study_summary

out, machine, wall, command = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
records = load_records(out / "runs.jsonl")
fits = json.loads((out / "fits.json").read_text())
summary = study_summary(records, fits, command=command.strip(), wall_s=wall)
path = out / f"scaling_emt-{machine}.json"
path.write_text(json.dumps(summary, indent=1))
with open(path.with_suffix(".csv"), "w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=list(summary["rows"][0]))
    writer.writeheader()
    writer.writerows(summary["rows"])
s = summary["summary"]
fmt = lambda v, ci: f"{v:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]" if v is not None and ci else str(v)
print(f"wrote {path} and {path.with_suffix('.csv').name}: {s['runs']} runs, study {s['study_wall_s']:.0f} s, "
      f"alpha {fmt(s['alpha'], s['alpha_ci'])}, beta {fmt(s['beta'], s['beta_ci'])}")
PYEOF
