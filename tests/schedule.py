"""The order in which the two xdist workers take test modules: the longest first.

With ``--dist loadscope`` a module runs whole on one worker, and each worker takes the next module when it is
free.  In file order (or xdist's default, most tests first) a three-minute module could start last and leave
the other core idle for minutes.  Longest-first keeps both busy to the end (the classic LPT rule).  The
seconds come from a measured run, kept in ``module_seconds.json``; a stale or missing figure only changes the
order, never what runs.  Refresh after a suite change that moves modules' times a lot:

    python -m pytest --durations=0 > /tmp/durations.log
    python tests/schedule.py /tmp/durations.log
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

SECONDS = Path(__file__).with_name("module_seconds.json")
UNKNOWN = 5.0  # a module not measured yet: between the long and the short ones
DURATION = re.compile(r"^\s*([\d.]+)s (?:setup|call|teardown)\s+(\S+?)::")


def module_seconds() -> dict[str, float]:
    try:
        return json.loads(SECONDS.read_text())
    except (OSError, ValueError):
        return {}


def longest_first(items: list) -> list:
    """``items`` regrouped by module, the modules longest first; tests keep their order inside a module."""
    seconds = module_seconds()
    by_module: dict[str, list] = defaultdict(list)
    for item in items:
        by_module[item.nodeid.split("::")[0]].append(item)
    order = sorted(by_module, key=lambda module: -seconds.get(module, UNKNOWN))
    return [item for module in order for item in by_module[module]]


def measured(log: str) -> dict[str, float]:
    """Seconds per test module from pytest's ``--durations=0`` report."""
    totals: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        match = DURATION.match(line)
        if match:
            totals[match[2]] += float(match[1])
    return {module: round(total, 1) for module, total in sorted(totals.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    found = measured(Path(sys.argv[1]).read_text())
    if not found:
        sys.exit(f"{sys.argv[1]}: no --durations=0 lines")
    SECONDS.write_text(json.dumps(found, indent=1) + "\n")
    print(f"{SECONDS}: {len(found)} modules, {sum(found.values()):.0f} s in all")
