"""MPtrj JSON release: field mapping, kBar -> eV/Å^3 with the VASP -> ASE sign flip, energy choice, scanner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from release_writers import mptrj_frame, write_mptrj

from gnnmegatron.data.formats import InputError
from gnnmegatron.data.formats.jsonscan import top_level_entries
from gnnmegatron.data.import_driver import import_dataset
from gnnmegatron.data.store import GraphStore

TRICLINIC = [[4.0, 0.0, 0.0], [1.0, 4.2, 0.0], [0.5, 0.3, 4.5]]
STRESS_KBAR = [[10.0, 1.0, 2.0], [1.0, -20.0, 3.0], [2.0, 3.0, 5.0]]
KBAR = 6.241509074e-4  # eV/Å^3 per kBar: 0.1 GPa / 160.21766208 GPa per eV/Å^3, worked out by hand


def _release(tmp_path, indent=None):
    data = {
        "mp-1": {
            "mp-1-0-0": mptrj_frame(TRICLINIC, [3, 8], [[0, 0, 0], [0.5, 0.5, 0.5]], -10.0,
                                    [[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]], STRESS_KBAR),
            "mp-1-0-1": mptrj_frame(TRICLINIC, [3, 8], [[0, 0, 0], [0.25, 0.5, 0.75]], -9.0,
                                    [[0.0, 0.0, 0.1], [0.0, 0.0, -0.1]], None, with_xyz=False),
        },
        "mp-2": {"mp-2-1-3": mptrj_frame(np.eye(3) * 2.5, [29], [[0.1, 0.2, 0.3]], -3.7, [[0.0, 0.0, 0.0]],
                                         np.eye(3) * -1.0)},
    }
    # a string with brackets and an escaped quote must not confuse the scanner
    data["mp-1"]["mp-1-0-0"]["structure"]["sites"][0]["label"] = 'Li } { "x" ] ['
    data["mp-1"]["mp-1-0-0"]["structure"]["sites"][1]["label"] = 'O \\ } \\'  # ends in an escaped backslash
    return write_mptrj(tmp_path / "MPtrj_2022.9_full.json", data, indent=indent)


def test_mapping_units_and_signs_against_hand_values(tmp_path):
    src = _release(tmp_path)
    summary = import_dataset([src], tmp_path / "mptrj.zarr", format="mptrj", progress=False, shard_bytes=400)
    assert summary["num_graphs"] == 3 and summary["shards"] >= 2  # small shard_bytes: one shard per mp-id
    ds = GraphStore(tmp_path / "mptrj.zarr")
    assert len(ds) == 3 and ds.num_shards == summary["shards"]
    a, b, c = ds.get_many([0, 1, 2])
    assert ds.structure_ids([0, 1, 2]) == ["mp-1/mp-1-0-0", "mp-1/mp-1-0-1", "mp-2/mp-2-1-3"]
    # default energy: corrected_total_energy (= uncorrected - 0.5 in this file)
    assert a["energy"] == pytest.approx(-10.5) and b["energy"] == pytest.approx(-9.5)
    np.testing.assert_array_equal(a["atomic_numbers"], [3, 8])
    np.testing.assert_allclose(a["cell"], TRICLINIC)
    np.testing.assert_allclose(a["positions"][1], [2.75, 2.25, 2.25])     # xyz of (1/2, 1/2, 1/2)
    np.testing.assert_allclose(b["positions"][1], [1.875, 2.325, 3.375])  # abc only: 1/4 a + 1/2 b + 3/4 c
    np.testing.assert_allclose(a["forces"], [[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]], atol=1e-7)
    # VASP kBar, positive = compressive -> ASE eV/Å^3, positive = tensile: xx 10 kBar -> -6.2415e-3
    assert a["stress"][0, 0] == pytest.approx(-6.241509074e-3, rel=1e-8)
    assert a["stress"][1, 1] == pytest.approx(1.2483018148e-2, rel=1e-8)
    np.testing.assert_allclose(a["stress"], -np.asarray(STRESS_KBAR) * KBAR, rtol=1e-8)
    assert b["stress"] is None                                            # frame without stress
    assert c["atomic_numbers"].tolist() == [29] and c["energy"] == pytest.approx(-4.2)  # single atom
    np.testing.assert_allclose(c["stress"], np.eye(3) * KBAR, rtol=1e-8)  # -1 kBar (tensile) -> +
    info = ds.provenance(2)
    assert info["source"] == "mptrj" and info["id"] == "mp-2/mp-2-1-3"
    assert "PBE" in info["source_info"]["dft_level"] and info["source_info"]["energy"] == "corrected_total_energy"


def test_uncorrected_energy_choice(tmp_path):
    src = _release(tmp_path, indent=2)  # pretty-printed JSON reads the same
    import_dataset([src], tmp_path / "u.zarr", format="mptrj", energy="uncorrected_total_energy", progress=False)
    ds = GraphStore(tmp_path / "u.zarr")
    assert [ds[i]["energy"] for i in range(3)] == pytest.approx([-10.0, -9.0, -3.7])
    with pytest.raises(Exception, match="--energy 'per_atom' is not available for --format mptrj"):
        import_dataset([src], tmp_path / "x.zarr", format="mptrj", energy="per_atom", progress=False)


@pytest.mark.parametrize("block", [5, 64, 1 << 20])
def test_scanner_finds_every_entry_across_block_boundaries(tmp_path, block):
    src = _release(tmp_path, indent=1)
    raw = src.read_bytes()
    found = list(top_level_entries(src, block=block))
    assert [k for k, _, _ in found] == ["mp-1", "mp-2"]
    ref = json.loads(raw)
    for key, a, b in found:
        assert json.loads(raw[a:b]) == ref[key]


def test_truncated_release_names_the_last_complete_entry(tmp_path):
    src = _release(tmp_path)
    raw = src.read_bytes()
    cut = raw.index(b'"mp-2"') + 200
    src.write_bytes(raw[:cut])
    with pytest.raises(InputError, match=r"MPtrj_2022.9_full.json: entry 'mp-2': the file ends inside it \(truncated "
                                         r"file\?\); the last complete entry is 'mp-1'"):
        import_dataset([src], tmp_path / "t.zarr", format="mptrj", progress=False)
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "t.zarr.partial").exists()
    src.write_text('[{"a": 1}]')
    with pytest.raises(InputError, match="top level must be a JSON object"):
        import_dataset([src], tmp_path / "t.zarr", format="mptrj", progress=False)
