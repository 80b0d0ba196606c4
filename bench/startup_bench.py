"""Start-up: every ``--help`` of ``ckpt`` and ``fuse-train``, and an option error, each a fresh process.

Each command runs ``--rounds`` times, alternated with the baseline (a bare ``python -c pass``, the interpreter's
own start-up, measured in the same rounds); the table prints the median and range of the wall time, the
median over the baseline, and whether torch was imported (it must not be, for help or an option error).

    python bench/startup_bench.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402, F401  (importing it makes the children start from bytecode, as an installed package does)

BASELINE = ("python -c pass", [sys.executable, "-c", "pass"])
SCRIPTS = Path(sysconfig.get_path("scripts"))


def entry(script: str, module: str) -> list[str]:
    """The installed console script, as users run it (not through a version manager's shim, whose own start-up
    is not ours); ``python -m`` where it is not installed."""
    path = SCRIPTS / script
    return [sys.executable, str(path)] if path.is_file() else [sys.executable, "-m", module]


CKPT = entry("ckpt", "ckpttools.cli")
FUSE = entry("fuse-train", "fuse_train")
COMMANDS = [
    ("ckpt --help", CKPT + ["--help"]),
    *((f"ckpt {c} --help", CKPT + [c, "--help"]) for c in ("verify", "inspect", "diff", "convert", "repair")),
    *((f"ckpt {c} --help", CKPT + [c, "--help"]) for c in ("remap", "preflight", "audit")),
    ("ckpt verify --bogus (option error)", CKPT + ["verify", "--bogus"]),
    ("fuse-train --help", FUSE + ["--help"]),
    *((f"fuse-train {c} --help", FUSE + [*c.split(), "--help"]) for c in ("val", "predict", "export")),
    ("fuse-train data check --help", FUSE + ["data", "check", "--help"]),
    ("fuse-train data import --help", FUSE + ["data", "import", "--help"]),
    ("fuse-train --epochs x (option error)", FUSE + ["--epochs", "x"]),
]


def run_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, capture_output=True)
    return time.perf_counter() - t0


def imports_torch(args: list[str]) -> bool:
    """Whether the command imports torch: run it in-process under ``-X importtime`` and look for the module."""
    out = subprocess.run([args[0], "-X", "importtime", *args[1:]], capture_output=True, text=True)
    return any(line.rstrip().endswith("| torch") for line in out.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name, _ in [BASELINE, *COMMANDS]}
    for _ in range(args.rounds):
        for name, argv in COMMANDS:
            times[BASELINE[0]].append(run_once(BASELINE[1]))  # the baseline beside every command, alternated
            times[name].append(run_once(argv))
    base = statistics.median(times[BASELINE[0]])
    print(f"{'command':44} {'median s':>9} {'range s':>13} {'x python':>9}  torch")
    print(f"{BASELINE[0]:44} {base:9.3f} {min(times[BASELINE[0]]):6.3f}-{max(times[BASELINE[0]]):.3f} {1:9.2f}")
    worst = 0.0
    for name, argv in COMMANDS:
        values = times[name]
        median = statistics.median(values)
        worst = max(worst, median)
        torch = "yes" if imports_torch(argv) else "no"
        print(f"{name:44} {median:9.3f} {min(values):6.3f}-{max(values):.3f} {median / base:9.2f}  {torch}")
    print(f"slowest median {worst:.3f} s over {args.rounds} rounds (target: every one at most 0.3 s)")


if __name__ == "__main__":
    main()
