"""The safety scan of a large pickle runs in a forked child (ckpttools.pickle.background): the verdict must be the
one the in-line scan gives, whatever happens to the child.

Each check runs in a fresh interpreter: under pytest-xdist this process has other threads, where the scan is
(rightly) never forked, so testing here would only test the in-line path."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the scan forks on Linux only")

COMPARE = r"""
import os, pickle, signal, sys
from ckpttools.pickle.background import IN_BACKGROUND_FROM, PendingScan, start_scan
from ckpttools.pickle.policy import judge
from ckpttools.pickle.scan import scan_pickle

data = open(sys.argv[1], "rb").read()
assert len(data) >= IN_BACKGROUND_FROM, len(data)
pending = start_scan(data)
assert isinstance(pending, PendingScan), "a large pickle in a single-threaded process is scanned in a child"
if sys.argv[2] == "kill":  # the child dies before it answers: the in-line scan stands in
    os.kill(pending._pid, signal.SIGKILL)
got, expected = pending.result(), scan_pickle(data)
assert (got.uses, got.calls, got.problems, got.error, got.end) == (
    expected.uses, expected.calls, expected.problems, expected.error, expected.end
)
print(sorted({j.status for j in judge(got)}))
"""


REREAD = r"""
import os, signal, sys
from ckpttools.pickle.background import PendingScan, start_scan
from ckpttools.pickle.policy import judge
from ckpttools.pickle.scan import scan_pickle

path, case = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
pending = start_scan(data, reread=lambda: open(path, "rb").read())
assert isinstance(pending, PendingScan) and pending._data is None, "only the digest is kept while the child scans"
if case == "changed":  # the file is rewritten with other bytes before the fallback reads it again
    with open(path, "r+b") as f:
        f.seek(len(data) // 2)
        f.write(b"X")
elif case == "gone":
    os.remove(path)
os.kill(pending._pid, signal.SIGKILL)  # the child dies before it answers: the fallback reads the bytes again
got = pending.result()
if case == "same":
    expected = scan_pickle(data)
    fields = lambda scan: (scan.uses, scan.calls, scan.problems, scan.error)  # noqa: E731
    assert fields(got) == fields(expected)
else:
    assert got.problems and not got.uses, got
print(sorted({j.status for j in judge(got)}), got.problems)
"""


@pytest.mark.parametrize("case", ["same", "changed", "gone"])
def test_a_scan_that_can_reread_keeps_no_copy_and_scans_only_the_bytes_that_were_read(tmp_path, case):
    """Where the bytes can be read again (a record of the file), the parent keeps only their digest while the
    child scans; the fallback scans them again only if they are the same bytes: changed or unreadable ones
    make a scan whose problem judges the pickle unsafe, never a scan of other bytes."""
    path = _big_pickle(tmp_path, harmful=True)
    proc = subprocess.run(
        [sys.executable, "-c", REREAD, str(path), case], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "dangerous" in proc.stdout  # the harmful pickle, or a pickle that could not be scanned
    if case != "same":
        assert ("changed while it was read" if case == "changed" else "could not be read again") in proc.stdout


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# loads a pickle with plain pickle in a fresh interpreter, os.system replaced by a recorder: what it would run
LIVE = r"""
import pickle, posix, sys
ran = []
posix.system = ran.append  # what GLOBAL posix.system resolves to; the real one is never called
pickle.loads(open(sys.argv[1], "rb").read())
print(ran)
"""


def _runs_under_plain_pickle(path: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", LIVE, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _verify_json(path: Path) -> subprocess.CompletedProcess:
    """`ckpt verify --json` in a fresh interpreter (one thread: where the scan is forked, as for a user)."""
    cmd = [sys.executable, "-m", "ckpttools.cli", "verify", str(path), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


def _big_pickle(tmp_path: Path, harmful: bool) -> Path:
    payload = [list(range(1_200_000)), {"x": (1, "two", 3.0)}]
    if harmful:
        payload.append(_RunsCode())
    path = tmp_path / ("harmful.pkl" if harmful else "plain.pkl")
    path.write_bytes(pickle.dumps(payload, protocol=2))
    # the harmful one is live: plain pickle calls os.system with its command (the harmless one calls nothing)
    assert _runs_under_plain_pickle(path) == ("['echo pwned']" if harmful else "[]")
    return path


@pytest.mark.parametrize("harmful", [False, True])
@pytest.mark.parametrize("child", ["answers", "kill"])
def test_background_scan_gives_the_in_line_verdict(tmp_path, harmful, child):
    path = _big_pickle(tmp_path, harmful)
    proc = subprocess.run(
        [sys.executable, "-c", COMPARE, str(path), child], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert ("dangerous" in proc.stdout) == harmful


def test_verify_of_a_large_harmful_torch_file_fails_with_the_child_scanning(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "big.pt"
    torch.save({"weights": torch.zeros(4), "steps": list(range(1_200_000)), "hook": _RunsCode()}, path)
    # the pickle really would run code: torch.load(weights_only=False) reaches os.system (recorded, not run)
    live = (
        "import posix, sys, torch; ran = []; posix.system = ran.append; "
        "torch.load(sys.argv[1], weights_only=False); print(ran)"
    )
    proc = subprocess.run([sys.executable, "-c", live, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "['echo pwned']", proc.stderr
    proc = _verify_json(path)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    codes = {f["code"] for f in report["findings"]}
    assert "safety.dangerous-reference" in codes


def test_a_large_pickle_scanned_early_and_a_shadowed_one_are_both_judged(tmp_path):
    """The scan of a large data.pkl met first in the directory starts before the other records are checked,
    and stands for the pickle read only when that is the very same bytes.  Here the directory names
    archive/data.pkl twice: a harmless large pickle first (the one read, scanned early) and a harmful one second,
    which torch.load may read as well: it is judged too, and the file fails on it."""
    import zipfile

    harmless, harmful = _big_pickle(tmp_path, False), _big_pickle(tmp_path, True)
    path = tmp_path / "two.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", harmless.read_bytes())
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("archive/data.pkl", harmful.read_bytes())
        zf.writestr("archive/version", b"3\n")
    proc = _verify_json(path)
    codes = {f["code"] for f in json.loads(proc.stdout)["findings"]}
    assert proc.returncode == 1 and "safety.dangerous-reference" in codes, proc.stdout[-2000:]
