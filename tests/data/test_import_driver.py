"""The parallel, resumable import driver and the sharded dataset it writes (manifest, sampler, trainer)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from release_writers import oc20_frame_text

from gnnmegatron.data.formats import InputError, OutputError, RejectedRecordError
from gnnmegatron.data.import_driver import import_dataset
from gnnmegatron.data.importers import import_ase
from gnnmegatron.data.manifest import join_datasets
from gnnmegatron.data.sampler import ChunkAwareSampler, GraphLoader
from gnnmegatron.data.store import GraphStore, StoreError

ROOT = Path(__file__).resolve().parents[2]


def _write_files(dirpath: Path, n_files: int = 4, n_frames: int = 20, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for j in range(n_files):
        frames = []
        for k in range(n_frames):
            a = bulk(["Cu", "Ag", "Pt"][(j + k) % 3], "fcc", a=3.9 + 0.02 * k).repeat((1 + k % 2, 1, 2))
            a.positions += rng.normal(0, 0.05, a.positions.shape)
            a.calc = SinglePointCalculator(a, energy=float(rng.normal(-3, 1)), forces=rng.normal(0, .3, (len(a), 3)),
                                           stress=rng.normal(0, 0.01, 6))
            frames.append(a)
        p = dirpath / f"part{j}.extxyz"
        ase.io.write(p, frames)
        paths.append(str(p))
    return paths


def _assert_same(a: GraphStore, b: GraphStore, ids: bool = True):
    assert len(a) == len(b) and a.num_atoms == b.num_atoms
    np.testing.assert_array_equal(a.atom_offsets, b.atom_offsets)
    np.testing.assert_array_equal(a.sources, b.sources)
    for x, y in zip(a.get_many(range(len(a))), b.get_many(range(len(b)))):
        for key in ("atomic_numbers", "positions", "cell", "pbc", "forces", "stress"):
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{key} of graph {x['index']}")
        assert x["energy"] == y["energy"]
    if ids:
        assert a.structure_ids(range(len(a))) == b.structure_ids(range(len(b)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _write_files(tmp_path_factory.mktemp("ase_inputs"))


@pytest.fixture(scope="module")
def parallel_dataset(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("par") / "ds.zarr"
    summary = import_dataset(files, out, format="ase", workers=2, progress=False)
    return out, summary


def test_parallel_sharded_import_reads_back_equal_to_single_process_import(files, parallel_dataset, tmp_path):
    out, summary = parallel_dataset
    assert summary["workers"] == 2 and summary["shards"] == 4 and summary["num_graphs"] == 80
    ds = GraphStore(out)
    assert ds.num_shards == 4 and ds.metadata["layout"] == "sharded"
    single = tmp_path / "single.zarr"
    import_ase(files, single, progress=False)  # one process, one plain store
    _assert_same(ds, GraphStore(single), ids=False)
    one = tmp_path / "one.zarr"
    import_dataset(files, one, format="ase", workers=1, progress=False)
    _assert_same(ds, GraphStore(one))
    assert ds.metadata["sources"] == ["part0", "part1", "part2", "part3"]
    assert ds.structure_ids([0, 79]) == ["part0.extxyz:frame0", "part3.extxyz:frame19"]


def test_sampler_and_loader_see_one_dataset(parallel_dataset):
    ds = GraphStore(parallel_dataset[0])
    sampler = ChunkAwareSampler.from_store(ds, seed=0, budget_atoms=40)
    seen = np.concatenate([np.asarray(b) for b in sampler])
    assert sorted(seen.tolist()) == list(range(len(ds)))  # every graph of every shard exactly once
    assert ds.num_chunks == 4 and sorted(set(ds.chunk_of(seen).tolist())) == [0, 1, 2, 3]
    batches = list(GraphLoader(ds, ChunkAwareSampler.from_store(ds, seed=1, budget_atoms=40), cutoff=4.0, prefetch=0))
    assert sum(int(b["num_atoms"].shape[0]) for b in batches) == len(ds)


def test_trainer_trains_on_a_sharded_dataset(parallel_dataset, tmp_path):
    from gnnmegatron.cli import DEMO_CONFIG
    from gnnmegatron.training.config import load_config
    from gnnmegatron.training.trainer import Trainer

    cfg = load_config(DEMO_CONFIG, [f"data.store={parallel_dataset[0]}", f"run_dir={tmp_path / 'run'}",
                                    "model.preset=egnn-tiny", "train.max_steps=2", "train.eval_every=2",
                                    "train.checkpoint_every=2", "train.progress=false", "data.budget_atoms=64"])
    report = Trainer(cfg, resume="never").fit()
    assert sum(report["graphs"].values()) == 80 and np.isfinite(report["val"]["energy_mae_per_atom"])


def _kill_midway(files, out, kill_at):
    script = textwrap.dedent(f"""
        import os
        from gnnmegatron.data import writer
        orig, count = writer.GraphStoreWriter.append_block, [0]
        def append_block(self, block, source=0, stop_at_error=True):
            count[0] += len(block)
            if count[0] >= {kill_at}:
                os._exit(137)  # like a kill -9 while structure {kill_at} is being written: no cleanup runs
            return orig(self, block, source, stop_at_error)
        writer.GraphStoreWriter.append_block = append_block
        from gnnmegatron.data.import_driver import import_dataset
        import_dataset({files!r}, {str(out)!r}, format="ase", workers=1, progress=False)
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_resume_after_a_killed_import(files, parallel_dataset, tmp_path):
    out = tmp_path / "resumed.zarr"
    proc = _kill_midway(files, out, kill_at=50)  # 20 frames per file: shards 0, 1 done, shard 2 half written
    assert proc.returncode == 137, proc.stderr
    work = Path(str(out) + ".partial")
    assert not out.exists() and (work / "shard-00000").is_dir() and (work / "shard-00001").is_dir()
    assert (work / "shard-00002.partial").is_dir() and not (work / "shard-00002").exists()
    kept = (work / "shard-00000" / "zarr.json").stat().st_mtime_ns
    with pytest.raises(OutputError, match="holds an interrupted import with other options.*--restart"):
        import_dataset(files, out, format="ase", index="::2", progress=False)
    summary = import_dataset(files, out, format="ase", workers=2, progress=False)
    assert summary["shards_resumed"] == 2 and summary["num_graphs"] == 80
    assert (out / "shard-00000" / "zarr.json").stat().st_mtime_ns == kept  # finished shard not rewritten
    assert not work.exists() and not list(out.glob("*.partial"))
    _assert_same(GraphStore(out), GraphStore(parallel_dataset[0]))


def _oc20_release(dirpath: Path) -> list[Path]:
    """Two S2EF files: a clean one, then one with every kind of bad record."""
    cell = np.diag([8.0, 8.0, 20.0])
    good = [oc20_frame_text([29, 8], [[0, 0, 5], [1.5, 0, 6]], cell, -10.0 - k, [[0.1, 0, 0], [-0.1, 0, 0]])
            for k in range(3)]
    bad = [oc20_frame_text([29, 8], [[0, 0, 5], [1.5, 0, 6]], cell, -12.0, [[0.1, 0, 0], [-0.1, 0, 0]]),
           oc20_frame_text([29, 8], [[0, 0, 5], [1.5, 0, 6]], cell, float("nan"), [[0.1, 0, 0], [-0.1, 0, 0]]),
           '2\nLattice="8 0 0 0 8 0 0 0 20" Properties=species:S:1:pos:R:3 energy=-3.0 pbc="T T T"\n'
           'Cu 0 0 5\nO 1.5 0 6\n',                                                    # no forces
           oc20_frame_text([29, 8], [[0, 0, 5], [1.5, 0, 6]], np.zeros((3, 3)), -4.0, [[0, 0, 0], [0, 0, 0]]),
           oc20_frame_text([29, 8], [[0, 0, 5], [0, 0, 5.01]], cell, -5.0, [[0, 0, 0], [0, 0, 0]]),
           oc20_frame_text([29, 8], [[0, 0, 5], [1.5, 0, 6]], cell, -13.0, [[0.2, 0, 0], [-0.2, 0, 0]])]
    dirpath.mkdir(parents=True, exist_ok=True)
    out = []
    for stem, frames in (("0", good), ("1", bad)):
        (dirpath / f"{stem}.extxyz").write_text("".join(frames))
        (dirpath / f"{stem}.txt").write_text("".join(f"random{stem}{k},frame{k},-1.0\n" for k in range(len(frames))))
        out.append(dirpath / f"{stem}.extxyz")
    return out


def test_bad_records_refused_then_skipped_and_logged_with_ids(tmp_path):
    paths = _oc20_release(tmp_path / "s2ef")
    out = tmp_path / "oc.zarr"
    with pytest.raises(RejectedRecordError) as err:
        import_dataset(paths, out, format="oc20", progress=False)
    msg = str(err.value)
    assert "1.extxyz: frame 1 (line 5): bad record (nan)" in msg and "id 'random11,frame1'" in msg
    assert "1 of 2 shards are finished and kept" in msg and "--on-bad skip" in msg
    summary = import_dataset(paths, out, format="oc20", on_bad="skip", progress=False)
    assert summary["shards_resumed"] == 1 and summary["num_graphs"] == 5
    assert summary["rejected"] == {"total": 4, "by_reason": {"degenerate_cell": 1, "missing_forces": 1, "nan": 1,
                                                              "overlapping_atoms": 1}}
    log = [json.loads(x) for x in (out / "rejections.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in log] == [("random11,frame1", "nan"), ("random12,frame2", "missing_forces"),
                                                     ("random13,frame3", "degenerate_cell"),
                                                     ("random14,frame4", "overlapping_atoms")]
    assert all("1.extxyz: frame" in r["where"] for r in log)
    ds = GraphStore(out)
    assert [ds[i]["energy"] for i in range(5)] == pytest.approx([-10.0, -11.0, -12.0, -12.0, -13.0])
    assert ds.structure_ids([3, 4]) == ["random10,frame0", "random15,frame5"]


def test_existing_dataset_survives_a_failed_overwrite_and_lock_refuses_a_live_import(files, tmp_path):
    out = tmp_path / "keep.zarr"
    import_dataset(files[:1], out, format="ase", progress=False)
    before = GraphStore(out).get_many(range(20))
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        import_dataset(files[:1], out, format="ase", progress=False)
    bad = tmp_path / "bad.extxyz"
    bad.write_text("2\nLattice=\"1 0 0 0 1 0\" Properties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH 0.5 0 0\n")
    with pytest.raises(InputError):
        import_dataset([str(bad)], out, format="ase", overwrite=True, progress=False)
    after = GraphStore(out).get_many(range(20))
    assert all(np.array_equal(x["positions"], y["positions"]) for x, y in zip(before, after))
    work = Path(str(out) + ".partial")
    work.mkdir()
    (work / "import.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(OutputError, match=f"another import \\(process {os.getppid()}\\) is writing"):
        import_dataset(files[:1], out, format="ase", overwrite=True, progress=False)


def test_join_datasets_remaps_sources(files, parallel_dataset, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    import_dataset(files[:2], a, format="ase", progress=False)
    import_dataset(files[1:3], b, format="ase", source_names=["part1", "extra"], progress=False)
    joined = tmp_path / "all.zarr"
    attrs = join_datasets([a, b], joined)
    assert attrs["sources"] == ["part0", "part1", "extra"] and attrs["num_graphs"] == 80
    ds, da, db = GraphStore(joined), GraphStore(a), GraphStore(b)
    assert ds.sources.tolist() == [0] * 20 + [1] * 20 + [1] * 20 + [2] * 20
    np.testing.assert_array_equal(ds[45]["positions"], db[5]["positions"])
    assert ds.structure_ids([45]) == db.structure_ids([5]) and ds[10]["energy"] == da[10]["energy"]
    assert ds.metadata["counts"]["per_source"] == [20, 40, 20]
    # a damaged input (a shard file of positions deleted) is refused, naming it; nothing is written
    victim = next(p for p in sorted(b.glob("shard-*/positions/c/*/*")) if p.is_file())
    victim.unlink()
    with pytest.raises(StoreError, match=rf"input {b} is damaged .*positions: shard file \d+ missing"):
        join_datasets([a, b], tmp_path / "broken.zarr")
    assert not (tmp_path / "broken.zarr").exists()


def test_every_record_rejected_gives_an_empty_dataset_and_a_full_log(tmp_path):
    bad = tmp_path / "bad.extxyz"
    bad.write_text("".join(oc20_frame_text([29, 29], [[0, 0, 5], [0, 0, 5.02]], np.diag([8.0, 8, 20]), -1.0 - k,
                                           [[0, 0, 0], [0, 0, 0]]) for k in range(3)))
    summary = import_dataset([bad], tmp_path / "e.zarr", format="oc20", on_bad="skip", progress=False)
    assert summary["num_graphs"] == 0 and summary["rejected"]["by_reason"] == {"overlapping_atoms": 3}
    ds = GraphStore(tmp_path / "e.zarr")
    assert len(ds) == 0 and ds.num_chunks == 0 and ds.metadata["shards"] == []
    assert [json.loads(x)["id"] for x in (tmp_path / "e.zarr" / "rejections.jsonl").read_text().splitlines()] == \
        ["bad.extxyz:frame0", "bad.extxyz:frame1", "bad.extxyz:frame2"]
