"""Option values are checked before anything starts (issue 26): a nonsense value is exit 2 naming the option
(click's range check, or fuse-train train's one-line check of the whole run configuration), never a run that
starts with it; every --help fits an 80-column terminal."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ckpttools.cli import main as CKPT
from fuse_train.cli import cli as FUSE

NONSENSE = [
    (CKPT, ["diff", "--atol", "-1", "a.pt", "b.pt"], "--atol"),
    (CKPT, ["diff", "--rtol", "-0.5", "a.pt", "b.pt"], "--rtol"),
    (CKPT, ["diff", "--top", "0", "a.pt", "b.pt"], "--top"),
    (CKPT, ["preflight", "--batch", "-4", "last.pt"], "--batch"),
    (CKPT, ["preflight", "--lr0", "0", "last.pt"], "--lr0"),
    (CKPT, ["preflight", "--img-size", "100", "last.pt"], "--img-size"),
    (CKPT, ["preflight", "--epochs", "0", "last.pt"], "--epochs"),
    (CKPT, ["remap", "--gpus", "0", "last.pt", "-o", "x.pt"], "--gpus"),
    (CKPT, ["convert", "--world-size", "0", "a.pt", "b"], "--world-size"),
    (FUSE, ["train", "--batch", "0"], "--batch"),
    (FUSE, ["train", "--epochs", "-1"], "--epochs"),
    (FUSE, ["train", "--img-size", "100"], "--img-size"),
    (FUSE, ["train", "--lr0", "-0.01"], "--lr0"),
    (FUSE, ["train", "--momentum", "1.5"], "--momentum"),
    (FUSE, ["train", "--workers", "-2"], "--workers"),
    (FUSE, ["val", "--conf", "2", "-w", "last.pt"], "--conf"),
    (FUSE, ["val", "--iou", "-0.1", "-w", "last.pt"], "--iou"),
    (FUSE, ["predict", "--conf", "1.5", "-w", "last.pt", "x.jpg"], "--conf"),
]


@pytest.mark.parametrize("program,args,option", NONSENSE, ids=[" ".join(a) for _, a, _ in NONSENSE])
def test_nonsense_values_exit_2_naming_the_option(tmp_path, monkeypatch, program, args, option):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(program, args)
    assert result.exit_code == 2, result.output
    # click's range check ("Invalid value for '--conf'"), or fuse-train train's one-line config check
    assert f"Invalid value for '{option}'" in result.output or f"error: {option}: must" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not any(tmp_path.iterdir())  # nothing was started, nothing written


@pytest.mark.parametrize("group", [CKPT, FUSE], ids=["ckpt", "fuse-train"])
def test_every_help_fits_80_columns(group):
    assert len(group.commands) >= 5
    for command in [None, *sorted(group.commands)]:
        result = CliRunner().invoke(group, ([command] if command else []) + ["--help"], terminal_width=80)
        wide = [line for line in result.output.splitlines() if len(line) > 80]
        assert result.exit_code == 0 and result.output and not wide, (command, wide)


USAGE_ERRORS = [
    (CKPT, ["convert", "--dtype", "fp8", "a.pt", "b.safetensors", "--json"], "ckpt convert", "--dtype"),
    (CKPT, ["verify", "--json"], "ckpt verify", "PATH"),
    (CKPT, ["verify", "--json", "--bogus", "a.pt"], "ckpt verify", "--bogus"),
    (CKPT, ["diff", "--json", "--atol", "-1", "a.pt", "b.pt"], "ckpt diff", "--atol"),
    (FUSE, ["--json", "--epochs", "3"], "fuse-train", "--json"),
    (FUSE, ["val", "--json", "--conf", "2", "-w", "last.pt"], "fuse-train val", "--conf"),
    (FUSE, ["val", "--json", "-w", "missing.pt"], "fuse-train val", "missing.pt"),
    (FUSE, ["data", "check", "--json", "missing"], "fuse-train data check", "missing"),
    (FUSE, ["predict", "-w", "missing.pt", "--source", "a", "--source-ir", "b", "--json"], "fuse-train predict", "a"),
]


@pytest.mark.parametrize("program,args,command,named", USAGE_ERRORS, ids=[" ".join(a) for _, a, _, _ in USAGE_ERRORS])
def test_json_errors_are_one_object_on_stdout_and_one_line_on_stderr(
    tmp_path, monkeypatch, program, args, command, named
):
    """The one error contract (issue 26): click's own usage errors too, exit 2, one JSON object with
    "ok": false on stdout for a script, one line on stderr for a person that names the command and the input."""
    import json

    monkeypatch.chdir(tmp_path)
    name = "ckpt" if program is CKPT else "fuse-train"
    result = CliRunner().invoke(program, args, prog_name=name, terminal_width=80)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    answer = json.loads(result.stdout)  # the whole of stdout is one object
    assert answer["ok"] is False and answer["exit_code"] == 2 and named in answer["error"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: ") and named in lines[0], lines


def test_usage_errors_without_json_print_nothing_on_stdout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(CKPT, ["diff", "--atol", "-1", "a.pt", "b.pt"], prog_name="ckpt")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "ckpt diff: error: Invalid value for '--atol': -1.0 is not in the range x>=0 (see ckpt diff --help)"
    )


def test_val_and_predict_write_to_project_name_and_never_over_an_earlier_result(tmp_path):
    """--project / --name as in training; an earlier result is never written over unless --exist-ok (issue 26)."""
    from fuse_train.commands import output_folder

    weights = tmp_path / "runs" / "fuse" / "exp" / "weights" / "best.pt"
    weights.parent.mkdir(parents=True)
    run = weights.parent.parent
    assert output_folder(str(weights), None, "val", None, False) == run / "val"
    (run / "val").mkdir()
    assert output_folder(str(weights), None, "val", None, False) == run / "val"  # empty: used
    (run / "val" / "metrics.json").write_text("{}")
    assert output_folder(str(weights), None, "val", None, False) == run / "val2"
    (run / "val2").mkdir()
    (run / "val2" / "metrics.json").write_text("{}")
    assert output_folder(str(weights), None, "val", None, False) == run / "val3"
    assert output_folder(str(weights), None, "val", None, True) == run / "val"
    assert (
        output_folder(str(weights), str(tmp_path / "elsewhere"), "night", None, False)
        == tmp_path / "elsewhere" / "night"
    )
    assert output_folder(str(weights), None, "val", str(tmp_path / "exact"), False) == tmp_path / "exact"


def test_one_device_reading_for_every_command():
    """--device is read in one place (fuse_train.process.devices) by training, val, predict and export: a device this
    machine lacks is a one-line ConfigError (exit 2), not a CUDA error from inside torch."""
    import torch

    from fuse_train.config import ConfigError
    from fuse_train.process.devices import select_device

    assert select_device("cpu") == torch.device("cpu") and select_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ConfigError, match="expected cpu, an index like 0, or cuda:0"):
        select_device("gpu1")
    if not torch.cuda.is_available():
        assert select_device("") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
            select_device("cuda:1")


@pytest.mark.parametrize("users", [None, "4"], ids=["unset", "set-by-the-user"])
def test_ckpt_keeps_openblas_to_one_thread_unless_the_user_said_otherwise(monkeypatch, users):
    """OpenBLAS's threads, started with numpy, spin for ~0.1 s of CPU each: on two cores that took a core from
    verify's pass.  Only the `ckpt` process's own command line sets it (a library caller's numpy is theirs),
    and a value the user gave is kept."""
    import atexit
    import os

    monkeypatch.setattr(atexit, "register", lambda *a, **k: None)  # main() registers gc.freeze for its exit
    if users is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", users)
    monkeypatch.setattr("sys.argv", ["ckpt", "--version"])
    with pytest.raises(SystemExit):
        CKPT.main()
    assert os.environ["OPENBLAS_NUM_THREADS"] == (users or "1")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit):
        CKPT.main(["--version"])  # called with arguments, as from a program: nothing set
    assert "OPENBLAS_NUM_THREADS" not in os.environ
