"""YOLOFuse's own trainer with ckpttools.integrations.ultralytics as its trainer class, checked the way issue 27
asks: every checkpoint it writes verifies with a digest, a ``kill -9`` of the whole process group at a random
moment leaves a ``last.pt`` that verifies, ``train(resume=True)`` with the integration continues it to the end, and
an edited infrared image blocks the resume (exit 3, naming infrared).  YOLOFuse is not on PyPI, so this is a
script run by hand against a checkout, not a test:

    git clone https://github.com/WangQvQ/YOLOFuse /tmp/YOLOFuse
    python bench/yolofuse_check.py /tmp/YOLOFuse [--kills 5] [--seed 0]

Prints one line per kill and a summary; exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ckpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpttools.cli", *args], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("yolofuse", type=Path, help="a YOLOFuse checkout")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fixtures.ultralytics83_site import ensure_site

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ensure_site()), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    driver = [sys.executable, str(ROOT / "fixtures" / "yolofuse_driver.py"), "--yolofuse", str(args.yolofuse)]
    rng = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(subprocess.run([*driver, "data", f"{tmp}/ds"], capture_output=True, text=True).stdout)["data"]
        for k in range(args.kills):
            name = f"kill{k}"
            train = [*driver, "train", data, tmp, name, "--epochs", "4", "--safe"]
            proc = subprocess.Popen(
                train, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            delay = rng.uniform(6.0, 12.0)  # the first save comes ~7 s after the start on 2 cores, the end ~12 s
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a cluster does
                proc.wait()
                killed = True
            last = Path(tmp) / name / "weights" / "last.pt"
            if not last.exists():
                print(f"kill {k} at {delay:4.1f} s: no last.pt yet (killed before the first save)")
                continue
            verify = ckpt("verify", str(last), "--json")
            report = json.loads(verify.stdout)
            digest = report.get("digest")  # verify recomputes it: a mismatch would be an error and exit 1
            position = str(report.get("position"))
            if position.startswith("final"):  # the kill came after the run's end: nothing to resume (Ultralytics)
                ok = verify.returncode == 0 and bool(digest)
                failures += not ok
                print(
                    f"kill {k} at {delay:4.1f} s: the run had finished; its final last.pt verify exit "
                    f"{verify.returncode} (digest {'checked' if digest else 'MISSING'})"
                )
                continue
            resumed = subprocess.run([*driver, "resume", str(last), "--safe"], env=env, capture_output=True, text=True)
            final = ckpt("verify", str(last), "--json")
            finished = str(json.loads(final.stdout).get("position")).startswith("final")
            ok = verify.returncode == 0 and bool(digest) and resumed.returncode == 0 and final.returncode == 0
            ok = ok and finished
            failures += not ok
            print(
                f"kill {k} at {delay:4.1f} s ({'killed' if killed else 'finished first'}): last.pt verify exit "
                f"{verify.returncode} ({report.get('position') or report.get('layout')}; digest "
                f"{'checked' if digest else 'MISSING'}), resume exit {resumed.returncode}, final verify exit "
                f"{final.returncode} ({'finished' if finished else 'NOT finished'})"
                + ("" if ok else f"  FAILED\n{resumed.stderr[-1500:]}")
            )
        # an edited infrared image blocks the resume of a checkpoint the integration wrote
        cut = [*driver, "train", data, tmp, "cut", "--epochs", "3", "--cut", "0", "--safe"]
        subprocess.run(cut, env=env, capture_output=True, check=True)
        before = ckpt("preflight", f"{tmp}/cut/weights/last.pt")
        ir = Path(data).parent / "imagesIR" / "train" / "0002.jpg"
        ir.write_bytes(ir.read_bytes() + b"\0")  # one byte more: a changed file
        after = ckpt("preflight", f"{tmp}/cut/weights/last.pt")
        blocked = after.returncode == 3 and "infrared" in after.stdout + after.stderr
        failures += not (before.returncode == 0 and blocked)
        print(
            f"infrared image edited: preflight exit {before.returncode} before, {after.returncode} after "
            f"({'names infrared' if blocked else 'does not name infrared: FAILED'})"
        )
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.0f} s)")
    sys.exit(code)
