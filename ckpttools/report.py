"""Findings and reports: what verify (and the checks other commands share) return.  Data only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ckpttools.errors import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE
from ckpttools.findings import FINDINGS

ERROR, WARNING, INFO = "error", "warning", "info"
SHOWN_PER_CODE = 20  # findings of one kind printed for a person
JSON_PER_CODE = 500  # ... and listed in --json (the counts are always whole)


@dataclass
class Finding:
    severity: str  # error | warning | info
    code: str  # stable identifier, documented in docs/findings.md
    message: str
    where: str = ""

    def __post_init__(self) -> None:
        if self.code not in FINDINGS:  # every code is documented: docs/findings.md is generated from FINDINGS
            raise ValueError(f"finding code {self.code!r} is not in ckpttools.findings.FINDINGS")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


MAX_TEXT = 400  # characters of one message or place shown (a path 200,000 levels deep is 600 kB)


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` with its middle cut out past ``limit`` characters (both ends say where it is)."""
    if len(text) <= limit:
        return text
    half = (limit - 20) // 2
    return f"{text[:half]} ...({len(text) - 2 * half:,} characters)... {text[-half:]}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless there is one: "1 tensor", "1,024 tensors"; ``plural`` where adding an
    "s" is wrong ("processes")."""
    return f"{n:,} " + (noun if n == 1 else plural or noun + "s")


def cap_findings(findings: list[Finding], per_code: int = SHOWN_PER_CODE) -> tuple[list[Finding], dict[str, int]]:
    """The findings to show: at most ``per_code`` of each (severity, code), in order, and how many of each code
    were left out.  A hostile zip with 300,000 extra records is 300,000 findings of one kind; printing them all
    costs minutes and megabytes and tells nothing the first few do not."""
    counts: dict[tuple[str, str], int] = {}
    kept, left = [], {}
    for f in findings:
        key = (f.severity, f.code)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= per_code:
            long = len(f.message) > MAX_TEXT or len(f.where) > MAX_TEXT
            kept.append(Finding(f.severity, f.code, shorten(f.message), shorten(f.where)) if long else f)
        else:
            left[f.code] = left.get(f.code, 0) + 1
    return kept, left


@dataclass
class Report:
    path: str
    format: str = "unknown"
    layout: str = "unknown"
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # what was recognised: epoch, step, parameter count, ...

    def add(self, severity: str, code: str, message: str, where: str = "") -> None:
        self.findings.append(Finding(severity, code, message, where))

    def extend(self, findings) -> None:
        self.findings.extend(findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def ok(self, strict: bool = False) -> bool:
        return not self.errors and not (strict and self.warnings)

    def exit_code(self, strict: bool = False) -> int:
        """0 / 1 by the findings; 2 when the path is not a checkpoint at all (the same answer as every other
        command gives it: a usage error, not damage)."""
        errors = self.errors
        if errors and all(f.code == "file.not-a-checkpoint" for f in errors):
            return EXIT_USAGE
        return EXIT_OK if self.ok(strict) else EXIT_PROBLEMS

    def shown(self, per_code: int = SHOWN_PER_CODE) -> tuple[list[Finding], dict[str, int]]:
        return cap_findings(self.findings, per_code)

    def to_dict(self, strict: bool = False) -> dict[str, Any]:
        kept, left = self.shown(JSON_PER_CODE)
        return {
            "path": self.path,
            "ok": self.ok(strict),
            "format": self.format,
            "layout": self.layout,
            "counts": {"errors": len(self.errors), "warnings": len(self.warnings)},
            "findings": [f.to_dict() for f in kept],
            **({"findings_left_out": left} if left else {}),
            **self.facts,
        }
