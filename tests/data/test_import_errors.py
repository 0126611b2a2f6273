"""Malformed inputs end in one line naming the file and frame (exit code 2), never a traceback; data info --verify."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gnnmegatron.cli import main

LATTICE6 = ('2\nLattice="3.6 0 0 0 3.6 0 0 0 3.6" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="T T T"\n'
            'Cu 0 0 0 0 0 0\nCu 1.8 1.8 0 0 0 0\n'
            '2\nLattice="3.6 3.6 3.6 90 90 90" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.1 pbc="T T T"\n'
            'Cu 0 0 0 0 0 0\nCu 1.8 1.8 0 0 0 0\n')


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(["data", *map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip()


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "lattice6.extxyz").write_text(LATTICE6)
    (tmp_path / "empty.extxyz").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary.extxyz").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "ok.extxyz").write_text(LATTICE6.split("2\n", 2)[1].join(["2\n", ""]))
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


@pytest.mark.parametrize("fmt", ["ase", "oc20"])
def test_lattice_with_six_numbers_names_file_and_frame(capsys, inputs, fmt):
    rc, err = _run(capsys, "import", inputs / "lattice6.extxyz", "--format", fmt, "--out", inputs / "o.zarr",
                   "--no-progress")
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{inputs / 'lattice6.extxyz'}: frame 1" in err and "Lattice" in err
    if fmt == "oc20":
        assert "frame 1 (line 5): Lattice has 6 numbers, expected 9" in err
    assert "nothing was written" in err and not (inputs / "o.zarr.partial").exists()


@pytest.mark.parametrize("name,fmt,expected", [
    ("empty.extxyz", "ase", "empty.extxyz: is empty (0 bytes)"),
    ("empty.extxyz", "mptrj", "empty.extxyz: is empty (0 bytes); expected a MPtrj JSON file"),
    ("folder", "ase", "folder: is a directory; give the files inside it"),
    ("folder", "qm7x", "folder: is a directory with no QM7-X HDF5 files in it"),
    ("binary.extxyz", "ase", "binary.extxyz: is a binary file"),
    ("binary.extxyz", "oc20", "binary.extxyz: is a binary file, not a OC20 S2EF"),
    ("missing.extxyz", "ase", "missing.extxyz: does not exist"),
])
def test_unusable_inputs_are_refused_before_anything_is_written(capsys, inputs, name, fmt, expected):
    rc, err = _run(capsys, "import", inputs / name, "--format", fmt, "--out", inputs / "o.zarr", "--no-progress")
    assert rc == 2 and expected in err and len(err.splitlines()) == 1
    assert not (inputs / "o.zarr").exists() and not (inputs / "o.zarr.partial").exists()


def test_unwritable_output_folder(capsys, inputs):
    rc, err = _run(capsys, "import", inputs / "ok.extxyz", "--out", inputs / "a_file" / "o.zarr", "--no-progress")
    assert rc == 2 and f"cannot write the output folder {inputs / 'a_file'}" in err
    if os.geteuid() != 0:  # permissions do not bind root
        ro = inputs / "readonly"
        ro.mkdir(mode=0o500)
        rc, err = _run(capsys, "import", inputs / "ok.extxyz", "--out", ro / "o.zarr", "--no-progress")
        assert rc == 2 and "cannot write the output folder" in err and "Permission denied" in err


@pytest.mark.parametrize("index,expected", [("1:x", "--index '1:x' is not a frame selection"),
                                            ("::0", "--index '::0' has step 0")])
def test_bad_index(capsys, inputs, index, expected):
    rc, err = _run(capsys, "import", inputs / "ok.extxyz", "--index", index, "--out", inputs / "o.zarr")
    assert rc == 2 and expected in err and not (inputs / "o.zarr.partial").exists()
    rc, err = _run(capsys, "import", inputs / "ok.extxyz", "--format", "oc20", "--index", "::2",
                   "--out", inputs / "o.zarr")
    assert rc == 2 and "--index/--ase-format apply to --format ase only" in err


def test_missing_optional_dependency_names_the_extra(capsys, inputs, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # import h5py now raises ImportError
    (inputs / "ani1x-release.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    rc, err = _run(capsys, "import", inputs / "ani1x-release.h5", "--format", "ani1x", "--out", inputs / "o.zarr")
    assert rc == 2 and "needs the Python package 'h5py'" in err and "pip install 'gnnmegatron[importers]'" in err


def _flip_byte_in_chunk(store: Path) -> Path:
    f = store / "shard-00000" / "positions" / "c" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[40] ^= 0xFF  # inside the first chunk's compressed bytes, not the index at the end
    f.write_bytes(bytes(raw))
    return f


def test_data_info_checks_shard_files_and_verify_reads_every_chunk(capsys, inputs):
    out = inputs / "ok.zarr"
    assert main(["data", "import", str(inputs / "ok.extxyz"), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    rc, _ = _run(capsys, "info", out, "--verify")
    assert rc == 0
    _flip_byte_in_chunk(out)
    rc, err = _run(capsys, "info", out)  # shard indices are intact: the quick check cannot see it
    assert rc == 0
    rc, err = _run(capsys, "info", out, "--verify")
    assert rc == 2 and "shard-00000/positions: chunk 0: checksum mismatch" in err
    f = out / "shard-00000" / "forces" / "c" / "0" / "0"
    f.write_bytes(f.read_bytes()[:-50])  # truncated shard file
    rc, err = _run(capsys, "info", out)
    assert rc == 2 and "shard-00000/forces: shard file 0" in err and "truncated" in err


def test_verify_finds_an_infinite_energy(capsys, inputs):
    """A store edited outside the writers (an infinite energy written with zarr): --verify names the
    array and the row."""
    import zarr

    out = inputs / "ok.zarr"
    assert main(["data", "import", str(inputs / "ok.extxyz"), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    zarr.open_array(str(out / "shard-00000" / "energy"), mode="r+")[0] = float("inf")
    rc, err = _run(capsys, "info", out, "--verify")
    assert rc == 2 and "shard-00000/energy: chunk 0 holds an infinite value at row 0" in err


def test_an_index_past_the_last_frame_is_an_error_not_an_empty_store(capsys, inputs):
    from gnnmegatron.data.importers import NoFrameSelected, iter_frames

    out = inputs / "none.zarr"
    rc, err = _run(capsys, "import", inputs / "ok.extxyz", "--index", "5", "--out", out, "--no-progress")
    assert rc == 2 and "index '5' selects no frame of it" in err and not out.exists()
    with pytest.raises(NoFrameSelected, match=r"ok.extxyz: index '7:9' selects no frame"):
        list(iter_frames(str(inputs / "ok.extxyz"), index="7:9"))
    assert len(list(iter_frames(str(inputs / "ok.extxyz"), index="0"))) == 1
    # several inputs share one selection: a shorter file adds nothing instead of stopping the import
    two = inputs / "two.extxyz"
    two.write_text((inputs / "ok.extxyz").read_text() * 2)
    both = inputs / "both.zarr"
    rc, err = _run(capsys, "import", inputs / "ok.extxyz", two, "--index", "1", "--out", both, "--no-progress")
    assert rc == 0, err
    from gnnmegatron.data.store import GraphStore

    assert len(GraphStore(both)) == 1
    from gnnmegatron.data.importers import import_ase

    assert import_ase([str(inputs / "ok.extxyz"), str(two)], inputs / "py.zarr", index="1",
                      progress=False)["num_graphs"] == 1
