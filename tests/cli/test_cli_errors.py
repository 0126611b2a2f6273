"""Bad input at the command line: one line naming what is wrong and exit code 2, not a traceback."""
import pytest

from gnnmegatron.cli import main


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("gnnmegatron: error:")]
    assert lines and "Traceback" not in err, err
    return lines[-1]


def test_unknown_preset_is_a_message(capsys):
    assert "unknown model preset 'egnn-huge'" in _error(capsys, ["model", "info", "egnn-huge"])


def test_predict_refuses_unreadable_inputs_and_bad_options(capsys, tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("not a structure\n")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    model = str(tmp_path / "no-model")  # inputs and options are checked before the model is loaded
    out = str(tmp_path / "p.npz")
    assert "device 'cuda:99' asked for" in _error(capsys, ["predict", model, str(junk), "--out", out,
                                                       "--device", "cuda:99"])
    assert f"out_path {empty_dir} is a directory" in _error(capsys, ["predict", model, str(junk), "--out",
                                                                     str(empty_dir)])


def test_predict_input_errors_name_the_file(capsys, tmp_path):
    from gnnmegatron.inference.predict import iter_input_structures

    junk = tmp_path / "junk.txt"
    junk.write_text("not a structure\n")
    short = tmp_path / "short.extxyz"
    short.write_text('4\nProperties=species:S:1:pos:R:3 pbc="F F F"\nCu 0 0 0\nCu 2 0 0\nCu 0 2 0\n')
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    for path, message in ((junk, "cannot be read as an ASE file (unknown file type"),
                          (short, "cannot be read as an ASE file (XYZError"),
                          (empty_dir, "a directory that is not a graph store")):
        structures, _, _ = iter_input_structures(str(path))
        with pytest.raises(ValueError, match=rf"input {path}: .*{message}".replace("(", r"\(")):
            list(structures)
    with pytest.raises(Exception, match=r"--index 'abc' is not a frame selection"):
        iter_input_structures(str(short), index="abc")


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "plan: --gpus 0: must be > 0"),
    (["--gpus", "8", "--gpu-mem", "-1"], "plan: --gpu-mem '-1' must be > 0"),
    (["--gpus", "8", "--gpu-mem", "lots"], "plan: --gpu-mem 'lots' is not a size"),
    (["--gpus", "8", "--per-node", "0"], "plan: --per-node 0: must be > 0"),
])
def test_plan_validates_its_numbers(capsys, argv, message):
    assert message in _error(capsys, ["plan", "--preset", "tpegnn-small", *argv])


def test_bench_checks_its_input_before_starting_processes(capsys, tmp_path):
    assert "config file" in _error(capsys, ["bench", str(tmp_path / "nope.yaml")])
    assert "its folder does not exist" in _error(capsys, ["bench", str(tmp_path / "nope.yaml"), "--out",
                                                          str(tmp_path / "missing" / "x.json")])
    assert "steps=0 must be an integer >= 1" in _error(capsys, ["bench", str(tmp_path / "nope.yaml"), "--steps", "0"])


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    import gnnmegatron.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_plan", interrupted)
    assert main(["plan", "--preset", "tpegnn-small", "--gpus", "8"]) == 130
    assert capsys.readouterr().err == "gnnmegatron: interrupted\n"
