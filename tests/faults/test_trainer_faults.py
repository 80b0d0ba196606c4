"""fuse-train under faults: a damaged last.pt is never trained from, copies a kill prevented are written again,
one process per run folder, a full disk is named, bad input is one line with exit 2 and writes nothing."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import TINY, load, run_train, training_state_differences

pytestmark = pytest.mark.slow  # end-to-end training runs


def _exp(cwd: Path) -> Path:
    return cwd / "runs" / "fuse" / "exp"


@pytest.fixture(scope="module")
def saved_every_step(tiny_data, tmp_path_factory):
    """A run stopped after step 3 with a save every step: last.pt is step 3, last.prev.pt step 2."""
    cwd = tmp_path_factory.mktemp("every_step")
    proc = run_train(
        ["--data", str(tiny_data), *TINY, "--save-every", "1"], cwd, env={"FUSE_TRAIN_STOP_AFTER_STEP": "3"}
    )
    assert proc.returncode == 130, proc.stderr
    return _exp(cwd)


def _flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    weight = load(path)["model"]["head.cls.0.2.weight"]
    at = bytes(data).find(weight.numpy().tobytes()[:64])
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_last_pt_falls_back_to_the_previous_good_one(saved_every_step, reference_run, tmp_path):
    run = tmp_path / "exp"
    shutil.copytree(saved_every_step, run)
    _flip_tensor_byte(run / "weights" / "last.pt")  # torch.load would load this silently
    proc = run_train(["--resume", str(run / "weights" / "last.pt")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "is damaged" in proc.stdout and "last.prev.pt" in proc.stdout
    final, reference = load(run / "weights" / "last.pt"), load(reference_run[0] / "weights" / "last.pt")
    assert training_state_differences(reference, final) == []  # resumed from step 2: the same run, exactly


@pytest.mark.parametrize("damage", ["both flipped", "empty last, flipped prev"])
def test_no_good_checkpoint_refuses_and_names_ckpt_repair(saved_every_step, tmp_path, damage):
    run = tmp_path / "exp"
    shutil.copytree(saved_every_step, run)
    last, prev = run / "weights" / "last.pt", run / "weights" / "last.prev.pt"
    if damage == "both flipped":
        _flip_tensor_byte(last)
    else:
        last.write_bytes(b"")
    _flip_tensor_byte(prev)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_train(["--resume", str(last)], tmp_path)
    assert proc.returncode == 2 and "ckpt repair" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_empty_last_pt_falls_back(saved_every_step, tmp_path):
    run = tmp_path / "exp"
    shutil.copytree(saved_every_step, run)
    (run / "weights" / "last.pt").write_bytes(b"")
    proc = run_train(["--resume", str(run / "weights" / "last.pt"), "--epochs", "3"], tmp_path)
    assert proc.returncode == 0 and "an empty file" in proc.stdout, proc.stderr


def test_kills_inside_saves_never_lose_best_or_period_copies(tiny_data, reference_run, tmp_path):
    """Kills at the rename points inside saves (the copies are placed before last.pt): after resuming to the
    end, every epoch{N}.pt and best.pt exists and the run equals the uninterrupted one."""
    rng = random.Random(1)
    args = ["--data", str(tiny_data), *TINY, "--save-period", "1"]

    def newest_last() -> Path | None:
        # a kill before a run's first last.pt leaves a folder with copies only; the next fresh run then takes a
        # new folder (exp2, ...: a fresh run never reuses a folder with checkpoints), which is followed here
        found = sorted(_exp(tmp_path).parent.glob("exp*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    kills = 0
    for _ in range(4):
        point = rng.choice(["before-rename", "after-rename", "keep-previous"])
        # counted on the background writer only: the run's other atomic writes (args.yaml, results.csv, plots)
        # would otherwise decide which save a count lands in
        env = {"CKPTTOOLS_FAULT": f"{point}@{rng.randint(2, 9)}:checkpoint-writer"}
        last = newest_last()
        proc = run_train(["--resume", str(last)] if last else args, tmp_path, env=env)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        kills += 1
    last = newest_last()
    assert kills >= 2 and last is not None
    while not load(last)["progress"].get("finished"):
        proc = run_train(["--resume", str(last)], tmp_path)
        assert proc.returncode == 0, proc.stderr
    weights = last.parent
    assert all((weights / f"epoch{n}.pt").exists() for n in (1, 2, 3)) and (weights / "best.pt").exists()
    assert training_state_differences(load(reference_run[0] / "weights" / "last.pt"), load(last)) == []
    assert not [p.name for p in weights.iterdir() if p.name.endswith(".tmp")]


def test_the_resume_probe_sees_a_held_lock_and_creates_nothing(tmp_path):
    """A resume asks whether the run folder is held before it reads the checkpoint (which the holder may be
    replacing at that moment: the second process then judged a half-replaced pair of files as damaged)."""
    from fuse_train.launch.runlock import LOCK_NAME, RunLocked, check_unlocked, run_lock

    check_unlocked(tmp_path / "nothing-here")  # no folder, no lock file: not held, and nothing is created
    assert not (tmp_path / "nothing-here").exists()
    run = tmp_path / "exp"
    with run_lock(run):
        with pytest.raises(RunLocked, match=f"in use by pid {os.getpid()}"):
            check_unlocked(run)
        assert f"pid {os.getpid()}" in (run / LOCK_NAME).read_text()  # the holder's stamp is left as it was
    check_unlocked(run)  # released: the probe passes and leaves the lock free
    with run_lock(run):
        pass


def test_a_second_process_on_the_same_run_is_refused(saved_every_step, tmp_path):
    run = tmp_path / "exp"
    shutil.copytree(saved_every_step, run)
    last = run / "weights" / "last.pt"
    longer = ["--resume", str(last), "--epochs", "40", "--allow-change", "epochs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "fuse_train", *longer],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = run / ".lock"
        deadline = time.time() + 120
        while not (lock.exists() and str(first.pid) in lock.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        second = run_train(longer, tmp_path)  # a second resume of the same run while the first trains
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by pid {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed holder's lock went with it: the run resumes without any clean-up
    proc = run_train(
        longer, tmp_path, env={"FUSE_TRAIN_STOP_AFTER_STEP": str(load(last)["progress"]["global_step"] + 1)}
    )
    assert proc.returncode == 130 and "in use" not in proc.stderr, proc.stderr


def test_disk_full_names_the_file_keeps_the_previous_checkpoint(tiny_data, reference_run, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    size = (reference_run[0] / "weights" / "last.pt").stat().st_size
    data_size = sum(p.stat().st_size for p in tiny_data.parent.rglob("*") if p.is_file())
    limit = int(size * 1.6) + data_size + (256 << 10)  # room for one checkpoint, not for the next one beside it
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): disk-full test needs root")
    try:
        proc = run_train(
            ["--data", str(tiny_data), *TINY, "--save-every", "1", "--project", str(mount / "runs")], tmp_path
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "disk full" in proc.stderr and "last.pt" in proc.stderr and "Traceback" not in proc.stderr
        last = mount / "runs" / "exp" / "weights" / "last.pt"
        assert load(last)["progress"]["global_step"] >= 1  # the previous checkpoint is whole
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------------------------


def _edit_yaml(data_yaml: Path, **changes) -> None:
    spec = yaml.safe_load(data_yaml.read_text())
    spec.update(changes)
    data_yaml.write_text(yaml.safe_dump(spec))


def _bad_names(d: Path):
    (d / "data.yaml").write_text((d / "data.yaml").read_text().replace("names:", "names_old:") + "names: {person: 0}\n")


def _bad_imgsz(d: Path):
    _edit_yaml(d / "data.yaml", imgsz=100)


def _non_utf8_label(d: Path):
    next((d / "labels" / "train").glob("*.txt")).write_bytes(b"0 0.5 0.5 0.1 0.1 \xff\xfe\n")


def _label_is_a_folder(d: Path):
    label = next((d / "labels" / "train").glob("*.txt"))
    label.unlink()
    label.mkdir()


def _bomb_image(d: Path):
    target = next((d / "images" / "train").glob("*.png"))
    Image.new("1", (15000, 15000)).save(target)  # 225 Mpixel, a few hundred KB on disk


def _no_labels(d: Path):
    shutil.rmtree(d / "labels" / "train")


def _one_image(d: Path):
    for i, image in enumerate(sorted((d / "images" / "train").glob("*.png"))):
        if i:
            image.unlink()
            (d / "imagesIR" / "train" / image.name).unlink()


BAD_INPUT = [
    (_bad_names, "names maps class ids"),
    (_bad_imgsz, "imgsz 100 must be a multiple of 32"),
    (_non_utf8_label, "not UTF-8"),
    (_label_is_a_folder, "must be a text file"),
    (_bomb_image, "decompression bomb"),
    (_no_labels, "no labels folder"),
    (_one_image, "training needs at least 2"),
]


@pytest.mark.parametrize("make_bad,fragment", BAD_INPUT, ids=[f.__name__.strip("_") for f, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_data, tmp_path, make_bad, fragment):
    data = tmp_path / "data"
    shutil.copytree(tiny_data.parent, data)
    _edit_yaml(data / "data.yaml", path=str(data))
    make_bad(data)
    proc = run_train(["--data", str(data / "data.yaml"), *TINY], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_file_outside_a_run_folder_is_refused(saved_every_step, tmp_path):
    loose = tmp_path / "x.pt"
    shutil.copy(saved_every_step / "weights" / "last.pt", loose)
    proc = run_train(["--resume", str(loose)], tmp_path)
    assert proc.returncode == 2 and "not inside a run folder" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
