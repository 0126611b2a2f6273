#!/usr/bin/env bash
# Turn the study's five public releases, as downloaded, into graph stores for multi-source pretraining.
#
#   scripts/prepare_study_data.sh DOWNLOADS OUT [WORKERS]
#
# DOWNLOADS holds one folder per source, as the releases unpack:
#   mptrj/  MPtrj_2022.9_full.json                       (figshare 23713842)
#   ani1x/  ani1x-release.h5                             (figshare, Smith et al. 2020)
#   oc20/   S2EF train files *.extxyz.xz + *.txt.xz      (e.g. s2ef_train_20M.tar, not uncompressed;
#           or fairchem LMDBs *.lmdb, then with OC20_ENERGY=adsorption or --oc20-ref, see below)
#   oc22/   S2EF-Total LMDBs *.lmdb                      (s2ef_total_train_val_test_lmdbs.tar.gz)
#   qm7x/   1000.xz ... 8000.xz (decompressed here) or 1000.hdf5 ... 8000.hdf5   (Zenodo 4288677)
# and writes OUT/mptrj.zarr, OUT/ani1x.zarr, OUT/oc20.zarr, OUT/oc22.zarr, OUT/qm7x.zarr (one sharded
# dataset per source, each with its rejections.jsonl) plus OUT/study.zarr: one dataset over all five
# (a manifest, no copy; the five sources keep their names) for `gnnmegatron pretrain` (data.store).
#
# Energies: MPtrj corrected_total_energy, ANI-1x wb97x_dz (Hartree -> eV), OC20 total, OC22 total,
# QM7-X ePBE0+MBD (override with MPTRJ_ENERGY, ANI1X_ENERGY, OC20_ENERGY, QM7X_ENERGY). The levels of
# theory differ per source; each structure keeps its source (and original id) so losses and
# reference energies can be per source.
#
# Environment: WORKERS (or the third argument; default: all cores), ON_BAD (skip: log bad records to
# <source>.zarr/rejections.jsonl and go on (default); refuse: stop at the first), OC20_REF (fairchem's
# oc20_ref.pkl, for total energies from OC20 LMDBs), GNNMEGATRON (the command; default `gnnmegatron`,
# else `python -m gnnmegatron.cli`).
#
# Safe to rerun: a finished source is skipped, an interrupted import continues from its finished shards.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
DOWNLOADS=$1
OUT=$2
WORKERS=${3:-${WORKERS:-$(nproc 2>/dev/null || echo 1)}}
ON_BAD=${ON_BAD:-skip}
if [ -z "${GNNMEGATRON:-}" ]; then
    if command -v gnnmegatron >/dev/null 2>&1; then GNNMEGATRON=gnnmegatron; else GNNMEGATRON="python -m gnnmegatron.cli"; fi
fi
mkdir -p "$OUT"

imported=()
missing=()

import_source() {  # name format input [extra args...]
    local name=$1 format=$2 input=$3
    shift 3
    if [ -f "$OUT/$name.zarr/zarr.json" ]; then
        echo "== $name: $OUT/$name.zarr exists, skipped (remove it to re-import)"
        imported+=("$OUT/$name.zarr")
        return 0
    fi
    echo "== $name: importing $input (--format $format, $WORKERS workers)"
    $GNNMEGATRON data import "$input" --format "$format" --out "$OUT/$name.zarr" --workers "$WORKERS" \
        --on-bad "$ON_BAD" --source-name "$name" "$@" > "$OUT/$name.import.json"
    imported+=("$OUT/$name.zarr")
}

# --- MPtrj
if [ -f "$DOWNLOADS/mptrj/MPtrj_2022.9_full.json" ]; then
    import_source mptrj mptrj "$DOWNLOADS/mptrj/MPtrj_2022.9_full.json" --energy "${MPTRJ_ENERGY:-corrected_total_energy}"
elif [ -d "$DOWNLOADS/mptrj" ]; then
    import_source mptrj mptrj "$DOWNLOADS/mptrj" --energy "${MPTRJ_ENERGY:-corrected_total_energy}"
else missing+=(mptrj); fi

# --- ANI-1x
if [ -d "$DOWNLOADS/ani1x" ]; then
    import_source ani1x ani1x "$DOWNLOADS/ani1x" --energy "${ANI1X_ENERGY:-wb97x_dz}"
else missing+=(ani1x); fi

# --- OC20 (S2EF extxyz/txt, or LMDBs)
if [ -d "$DOWNLOADS/oc20" ]; then
    extra=(--energy "${OC20_ENERGY:-total}")
    if [ -n "${OC20_REF:-}" ]; then extra+=(--oc20-ref "$OC20_REF"); fi
    import_source oc20 oc20 "$DOWNLOADS/oc20" "${extra[@]}"
else missing+=(oc20); fi

# --- OC22 (S2EF-Total LMDBs)
if [ -d "$DOWNLOADS/oc22" ]; then
    import_source oc22 oc22 "$DOWNLOADS/oc22"
else missing+=(oc22); fi

# --- QM7-X (the Zenodo files are xz-compressed HDF5: decompress next to the output once)
if [ -d "$DOWNLOADS/qm7x" ]; then
    qdir="$DOWNLOADS/qm7x"
    if ! ls "$qdir"/*.hdf5 >/dev/null 2>&1 && ls "$qdir"/*.xz >/dev/null 2>&1; then
        qdir="$OUT/.qm7x-hdf5"
        mkdir -p "$qdir"
        for f in "$DOWNLOADS"/qm7x/*.xz; do
            target="$qdir/$(basename "${f%.xz}").hdf5"
            if [ ! -f "$target" ]; then
                echo "== qm7x: decompressing $f"
                xz -dc "$f" > "$target.tmp" && mv "$target.tmp" "$target"
            fi
        done
    fi
    import_source qm7x qm7x "$qdir" --energy "${QM7X_ENERGY:-ePBE0+MBD}"
else missing+=(qm7x); fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "warning: no download folder for: ${missing[*]} (expected under $DOWNLOADS/)" >&2
fi
if [ ${#imported[@]} -eq 0 ]; then
    echo "error: nothing to import under $DOWNLOADS (see the usage at the top of $0)" >&2
    exit 2
fi

echo "== joining ${#imported[@]} sources into $OUT/study.zarr"
$GNNMEGATRON data join "${imported[@]}" --out "$OUT/study.zarr" --overwrite
$GNNMEGATRON data info "$OUT/study.zarr" > "$OUT/study.info.json"
echo "done: $OUT/study.zarr (metadata in $OUT/study.info.json; import summaries in $OUT/*.import.json)"
