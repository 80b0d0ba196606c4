"""A job relaunched with the same command line continues the run it was, from its newest good checkpoint.

Launchers restart a preempted or failed job with the command it had: ``torchrun --max-restarts N`` restarts
every worker (``TORCHELASTIC_RESTART_COUNT`` > 0), Slurm requeues the batch script (``SLURM_RESTART_COUNT`` > 0),
a Kubernetes Job starts a new pod.  None of them adds ``--resume``, so without this a restart would start over
in ``name2`` beside the run it should continue.

The rule, one definition for every launcher:

* A fresh run records its launch in ``<run>/launch.json``: the options given on the command line and the job
  it belongs to (torchrun's run id, Slurm's job id; none for a plain start).
* A restart (the counters above, ``--auto-resume`` for launchers that set none, or simply a launch inside a
  named job: with two torchrun agents only the agent whose worker died counts a restart, the other restarts
  its workers with a count of 0, and both must continue the same run) looks through
  ``<project>/<name>``, ``<name>2``, ``<name>3``, ... and takes the *last* folder whose launch record has the
  same options and job: the run this command started most recently.  It resumes from that folder's newest
  checkpoint that verifies (``last.pt``, else ``last.prev.pt``), through the preflight as any resume; a folder
  with no checkpoint yet (killed before its first save) is trained fresh in place.  No folder: a fresh run.
* A restart of ``--resume PATH`` continues PATH's run folder from its newest ``last`` checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ckpttools.atomic import atomic_write

LAUNCH_FILE = "launch.json"
LAST_NAMES = ("last.pt", "last.dcp")  # --save-format pt / dcp


def restart_reason(env: Mapping[str, str] = os.environ) -> str | None:
    """'torchrun restart N' / 'Slurm requeue N' when a launcher restarted this command, else None."""
    for variable, what in (
        ("TORCHELASTIC_RESTART_COUNT", "torchrun restart"),
        ("SLURM_RESTART_COUNT", "Slurm requeue"),
    ):
        count = env.get(variable, "0") or "0"
        if count.isdigit() and int(count) > 0:
            return f"{what} {int(count)}"
    return None


def job_identity(env: Mapping[str, str] = os.environ) -> str:
    """The job a process belongs to, as launchers name it; '' for a plain start (and for torchrun's default
    run id 'none', which every job without ``--rdzv-id`` shares)."""
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return "torchrun:" + env["TORCHELASTIC_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        return "slurm:" + env["SLURM_JOB_ID"]
    return ""


def launch_record(command_options: dict, env: Mapping[str, str] = os.environ) -> dict:
    """What identifies a launch: the options given on the command line (JSON values) and the job."""
    return {"options": json.loads(json.dumps(command_options, sort_keys=True, default=str)), "job": job_identity(env)}


def write_launch(run_dir: Path, record: dict) -> None:
    with atomic_write(Path(run_dir) / LAUNCH_FILE, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


def _read_launch(run_dir: Path) -> dict | None:
    try:
        record = json.loads((run_dir / LAUNCH_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_folders(project: str, name: str) -> list[Path]:
    """``<project>/<name>``, ``<name>2``, ``<name>3``, ... as far as they exist (the names fresh runs take)."""
    base = Path(project) / name
    folders, n = [], 1
    while True:
        folder = base if n == 1 else base.with_name(f"{name}{n}")
        if not folder.exists():
            return folders
        folders.append(folder)
        n += 1


def relaunched_run(project: str, name: str, record: dict) -> Path | None:
    """The run folder this launch started most recently (same options, same job), or None."""
    matches = [folder for folder in run_folders(project, name) if _read_launch(folder) == record]
    return matches[-1] if matches else None


def newest_last(run_dir: Path) -> Path | None:
    """The run's ``last`` checkpoint (``last.pt`` or ``last.dcp``; the newer if both), or None."""
    found = [run_dir / "weights" / n for n in LAST_NAMES if (run_dir / "weights" / n).exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
