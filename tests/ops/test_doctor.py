"""``gnnmegatron doctor``: the table on this machine's devices, and a wrong backend is caught."""

import json

import torch

from gnnmegatron import doctor
from gnnmegatron.cli import main


def test_doctor_passes_on_cpu_and_prints_the_table(capsys):
    rows = doctor.run(devices=["cpu"], shapes=["small"], repeats=1)
    ran = [r for r in rows if r.result != "SKIP"]
    assert {r.op for r in ran} == set(doctor.OPS)
    assert {r.backend for r in ran} == {"torch"}
    assert all(r.result == "PASS" for r in ran), doctor.format_table(rows)
    assert all(r.max_error is not None and r.max_error <= r.tolerance and r.time_ms > 0 for r in ran)
    skipped = [r for r in rows if r.result == "SKIP"]
    if not torch.cuda.is_available():
        assert [r.backend for r in skipped] == ["triton"] and "CUDA" in skipped[0].note
    assert main(["doctor", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fused_message_aggregate[grad2]" in out and "rows pass" in out and "FAIL" not in out
    assert "  PASS faithful_message_aggregate[grad2] cpu torch float32 small err" in out  # a line per finished row


def test_doctor_json_is_written_row_by_row(tmp_path, monkeypatch):
    """The JSON is rewritten after every row (a run stopped part-way keeps its rows), whole at the end."""
    path = tmp_path / "doctor.json"
    seen = []
    real = doctor._write_json

    def spy(json_path, env, rows, finished):
        real(json_path, env, rows, finished)
        seen.append((len(json.loads(path.read_text())["rows"]), finished))

    monkeypatch.setattr(doctor, "_write_json", spy)
    assert doctor.main(quick=True, devices=["cpu"], json_path=str(path)) == 0
    doc = json.loads(path.read_text())
    partial = [n for n, finished in seen if not finished]  # one more row each time
    assert partial == list(range(1, len(partial) + 1)) and len(partial) >= len(doctor.OPS), seen
    assert seen[-1] == (len(doc["rows"]), True) and doc["finished"], seen
    assert [r["result"] for r in doc["rows"]].count("PASS") >= len(doctor.OPS)
    assert not list(tmp_path.glob("*.tmp"))


def test_doctor_reports_a_wrong_backend(monkeypatch, capsys):
    """A torch backend whose segment sums are off by 1e-3 relative: its rows fail, exit status 1."""
    import importlib

    module = importlib.import_module("gnnmegatron.ops.segment_reduce")  # the package exports the function

    real = module._torch_forward

    def wrong(src2, index, ptr, reduce):
        out, arg = real(src2, index, ptr, reduce)
        return out * (1 + 1e-3), arg

    monkeypatch.setattr(module, "_torch_forward", wrong)
    rows = doctor.run(devices=["cpu"], shapes=["small"], repeats=1)
    failed = {r.op for r in rows if r.result == "FAIL"}
    assert failed == {"segment_reduce[sum]", "segment_reduce[max]"}, doctor.format_table(rows)
    assert main(["doctor", "--quick", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out
