"""Rich views and JSON output of reports; errors to stderr."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ckpttools.findings import FINDINGS
from ckpttools.report import JSON_PER_CODE, Report, cap_findings, counted, shorten

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


# emoji=False on every console (tests/test_architecture.py): rich turns ":fire:" in printed text into an emoji,
# and tensor names, paths and messages are printed as they are ("layer:fire:.weight" is a name, not a picture)
def stdout() -> Console:
    return Console(file=TrimmedLines(sys.stdout), highlight=False, emoji=False)


class TrimmedLines:
    """A text stream that writes each line without trailing spaces.  Rich pads tables' titles and padded blocks
    to the terminal's width and keeps the space where it wraps a line: in a log file or copied text they are
    noise.  Everything else (isatty, fileno, encoding) is the wrapped stream's, so rich still sees a terminal."""

    def __init__(self, stream):
        self._stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        if lines:
            self._stream.write("\n".join(TRAILING.sub("", line) for line in lines) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:  # a print with end="": written as it is
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # one-line errors stay one line


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


TRAILING = re.compile(r" +(?=(?:\x1b\[[0-9;]*m)*$)")


def print_trimmed(console: Console, renderable: Any) -> None:
    """Print a table or padded block without the spaces rich pads each line with to the terminal's width (they
    end up in log files and copied text)."""
    with console.capture() as captured:
        console.print(renderable, highlight=False)
    for line in captured.get().splitlines():
        console.file.write(TRAILING.sub("", line) + "\n")
    console.file.flush()


def print_parts(console: Console, parts: list[str], sep: str, indent: int = 2) -> None:
    """``parts`` joined by ``sep`` on as few lines as the terminal allows, each line indented, a line broken
    only between parts ("4,146,255 parameters" is never split from its number)."""
    width = max(20, console.width - indent)
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    for line in lines:
        print_trimmed(console, Padding(Text(line), (0, 0, 0, indent)))


GROUP_OVER = 3  # more findings of one code than this are one grouped entry (all of them with --all)
SEVERITIES = ("error", "warning", "info")
LOST = ("zip.record-missing", "zip.record-truncated")  # a storage whose bytes are gone
CUT_SHORT = ("zip.no-central-directory", "zip.record-truncated")


def render_verify(report: Report, console: Console, strict: bool = False, show_all: bool = False) -> None:
    """The summary first (verdict, what happened, what to do), then at most a screen of findings: a code met
    more than GROUP_OVER times is one entry saying how many and where; ``show_all`` lists every one."""
    console.print(report.path, markup=False, highlight=False, style="bold")
    facts = report.facts
    about = [report.format, report.layout]
    if facts.get("position"):  # as people count: epochs from 1 (the trainer's own record says how)
        about.append(facts["position"])
    else:
        about += [f"{k} {facts[k]}" for k in ("epoch", "step") if facts.get(k) is not None]
    if isinstance(facts.get("parameter_count"), int):
        about.append(f"{facts['parameter_count']:,} parameters")
    print_parts(console, [str(a) for a in about], " · ")
    n_err, n_warn = len(report.errors), len(report.warnings)
    ok = report.ok(strict)
    verdict = "[green]OK[/]" if ok else "[bold red]FAILED[/]"
    console.print(
        f"{verdict}: {counted(n_err, 'error')}, {counted(n_warn, 'warning')}"
        + (" (--strict: warnings fail)" if strict and n_warn and not n_err else "")
    )
    for line in _what_happened(report):
        print_trimmed(console, Padding(Text(line), (0, 0, 0, 2)))  # wrapped lines keep the indent
    groups: dict[tuple[str, str], list] = {}
    for f in report.findings:
        groups.setdefault((f.severity, f.code), []).append(f)
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=7, no_wrap=True)
    grid.add_column(overflow="fold")
    grouped = False
    for (severity, code), items in sorted(groups.items(), key=lambda kv: SEVERITIES.index(kv[0][0])):
        label = f"[{STYLE[severity]}]{severity}[/]"
        if code == "safety.code-reference" and not show_all:
            grid.add_row(label, f"[bold]{code}[/] x{len(items)}\n{escape(_code_references(items))}")
            grouped = True
        elif len(items) > GROUP_OVER and not show_all:
            where = _sections(f.where for f in items)
            example = ", ".join(escape(f.where) for f in items[:2] if f.where)
            grid.add_row(
                label,
                f"[bold]{code}[/] x{len(items):,}{(' in ' + escape(where)) if where else ''}\n"
                f"{escape(shorten(items[0].message, 200))}" + (f"\n[dim]e.g. at {example}[/]" if example else ""),
            )
            grouped = True
        else:
            kept, _ = cap_findings(items, len(items) if show_all else GROUP_OVER)
            for f in kept:
                place = f" [dim]at {escape(f.where)}[/]" if f.where else ""
                grid.add_row(label, f"[bold]{f.code}[/]{place}\n{escape(f.message)}")
    if groups:
        print_trimmed(console, grid)
    if grouped:
        console.print(f"[dim](--all lists every finding; --json up to {JSON_PER_CODE} of each code)[/]")


def lost_summary(lost: list[str], shown: int = 5) -> list[str]:
    """`ckpt repair`'s lost tensors ('model.x (record missing)'): how many, in which parts, the first few."""
    lines = [f"lost: {counted(len(lost), 'tensor')}, in {_sections(lost)}"]
    lines += [f"  {name}" for name in lost[:shown]]
    if len(lost) > shown:
        lines.append(f"  ... and {len(lost) - shown:,} more (--json lists them all)")
    return lines


def _what_happened(report: Report) -> list[str]:
    """One line on what happened to the file, and what to do, from the findings' own remedies."""
    codes = [f.code for f in report.errors]
    lines = []
    if any(c in CUT_SHORT for c in codes):
        lost = [f for f in report.errors if f.code in LOST]
        where = _sections(f.where for f in lost if f.code == "zip.record-missing")  # (a cut record: its name)
        lines.append(
            f"the file ends early (cut off while it was written): {counted(len(lost), 'storage record')} lost"
            + (f", in {where}" if where else "")
        )
        lines.append(
            f"to do: ckpt repair {report.path} -o FIXED.pt (--from an earlier checkpoint fills what was lost), "
            "or resume from the previous save (last.prev.pt)"
        )
        codes = [c for c in codes if c not in CUT_SHORT + LOST]
    remedies = []
    for code in dict.fromkeys(codes):
        remedy = FINDINGS[code].remedy
        if remedy and remedy != "as above" and remedy not in remedies:
            remedies.append(remedy)
    lines += [f"to do: {r}" for r in remedies[: max(0, 2 - len(lines))]]
    return lines


def _sections(places) -> str:
    """'optimizer (754), model (3)': how many findings fall in each top-level part of the checkpoint."""
    counts: dict[str, int] = {}
    for place in places:
        head = place.replace("[", "/").split("/", 1)[0] if place else ""
        if head:
            counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} ({v:,})" for k, v in top[:4])
    return text + (f" and {len(top) - 4} more" if len(top) > 4 else "")


def _code_references(items) -> str:
    """Code-reference warnings as one line per library: 'torch: Sequential, Conv2d, ...; __main__: Tiny'."""
    by_library: dict[str, list[str]] = {}
    for f in items:
        found = re.search(r"of ([\w.]+): needs the '([^']+)' library", f.message)
        library, name = (found.group(2), found.group(1).rsplit(".", 1)[-1]) if found else ("other", f.message[:40])
        by_library.setdefault(library, []).append(name)
    parts = [
        f"{lib}: {', '.join(dict.fromkeys(names[:6]))}{', ...' if len(set(names)) > 6 else ''}"
        for lib, names in by_library.items()
    ]
    return (
        "classes torch.load(weights_only=False) would import (read here as inert placeholders); "
        + "; ".join(parts)
        + ". `ckpt convert --weights-only` makes a copy without them"
    )


def _fact(value: Any) -> str:
    """A number as a person reads it: 4,146,255 and 0.863534 (--json keeps every digit)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def render_inspect(summary: dict, console: Console) -> None:
    console.print(f"[bold]{summary['path']}[/]  format {summary['format']}, layout {summary['layout']}")
    keys = ("position", "step") if summary.get("position") else ("epoch", "step")
    facts = [(k, summary.get(k)) for k in (*keys, "best_fitness", "parameter_count", "tensors")]
    print_parts(console, [f"{k.replace('_', ' ')}: {_fact(v)}" for k, v in facts if v is not None], "  ")
    for label, text in (summary.get("model") or {}).items():  # what the trainer says about its model
        console.print(f"  {label}: {escape(text)}")
    if summary.get("bytes_by_dtype"):
        console.print(
            "  bytes by dtype: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in summary["bytes_by_dtype"].items())
        )
    if summary.get("devices"):
        devices = summary["devices"].items()
        console.print("  saved on: " + ", ".join(f"{k} ({counted(v, 'storage')})" for k, v in devices))
    tree = Tree("keys")
    _add(tree, summary["keys"])
    print_trimmed(console, tree)
    if summary.get("run_arguments"):
        table = Table("argument", "value", title="run arguments", title_justify="left")
        for k, v in summary["run_arguments"].items():
            table.add_row(k, str(v))
        print_trimmed(console, table)
    if summary.get("code_references"):
        console.print(
            "code references (never imported here): "
            + ", ".join(
                f"{r['reference']}" + (" [bold red](dangerous)[/]" if r["status"] == "dangerous" else "")
                for r in summary["code_references"]
            )
        )
    for p in summary.get("problems_while_reading", []):
        console.print(f"[{STYLE[p['severity']]}]{p['severity']}[/] {p['code']}: {escape(p['message'])}")
    for code, n in summary.get("problems_left_out", {}).items():
        console.print(f"[dim]... and {n:,} more {escape(code)} like these[/]")


def _add(node: Tree, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict):
                _add(node.add(Text(str(k))), v)
            else:  # one line a key: a long value is cut at the terminal's edge (--json has it whole)
                node.add(Text.assemble(f"{k}: ", (str(v), "dim"), no_wrap=True, overflow="ellipsis"))
    else:
        node.add(Text(str(value)))


REMEDIES = {
    "world-size": "to resume on {requested} process(es) exactly, rewrite the checkpoint first: "
    "ckpt remap CKPT --gpus {requested} -o NEW.pt, then resume from NEW.pt"
}


def render_preflight(report, console, title: str = "preflight") -> None:
    """A rich table: field / checkpoint / requested / status."""
    table = Table(title=title, title_justify="left")
    for col in ("field", "checkpoint", "requested", "status"):
        table.add_column(col, overflow="fold")
    style = {"same": "green", "changed": "bold red", "allowed": "yellow", "note": "cyan"}
    for c in report.checks:
        if c.status == "same":
            continue
        status = c.status + (f": {c.note}" if c.note else "")
        table.add_row(c.field, middle_cut(c.recorded), middle_cut(c.requested), f"[{style[c.status]}]{status}[/]")
    same = [c.field for c in report.checks if c.status == "same"]
    if table.row_count:
        print_trimmed(console, table)
    if same:
        console.print(f"unchanged: {', '.join(same)}", highlight=False)
    for c in report.checks:
        if c.status == "same" and c.note:
            console.print(f"  {c.field}: {c.note}", highlight=False, markup=False)
    for c in report.blocked:
        if c.field in REMEDIES:
            console.print(REMEDIES[c.field].format(requested=c.requested), highlight=False, markup=False)


def middle_cut(value: Any) -> str:
    """A long value shown by its two ends."""
    text = str(value)
    return text if len(text) <= 60 else text[:28] + "…" + text[-28:]


def render_audit(report, console: Console) -> None:
    """Lineage, then one row per resume boundary: where, what was checked, verdict."""
    epochs = counted(report.epochs, "epoch")
    console.print(f"[bold]{escape(report.run_dir)}[/]  {report.layout}, {epochs} in results.csv")
    for event in report.lineage:
        changes = _changes_text(event.get("changes"))
        console.print(
            f"  {event.get('date', '?')}  {event.get('event')} at step {event.get('step')}"
            + escape(f": {changes}" if changes else ""),
            highlight=False,
        )
    if report.boundaries:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        colour = {"seamless": "green", "allowed": "yellow", "broken": "bold red", "not judged": "dim"}
        for b in report.boundaries:
            checks = "\n".join(f"{k}: {v}" for k, v in b.checks.items())
            grid.add_row(
                f"[{colour[b.verdict]}]{b.verdict}[/]",
                f"[bold]epoch {b.epoch:g}[/] [dim]({escape(b.source)})[/]\n{escape(checks)}",
            )
        print_trimmed(console, grid)
    for problem in report.problems:
        console.print(f"[bold red]broken[/] {escape(problem)}")
    if report.notes:  # a long note wraps under its own text, not under "note:"
        notes = Table.grid(padding=(0, 1))
        notes.add_column(no_wrap=True, style="dim")
        notes.add_column(style="dim")
        for note in report.notes:
            notes.add_row("note:", Text(note))
        print_trimmed(console, notes)
    verdicts = {b.verdict for b in report.boundaries}
    if not report.ok:
        console.print("[bold red]BROKEN[/]: see above")
    elif verdicts - {"seamless"}:  # allowed changes or boundaries that could not be judged: say so, not "seamless"
        counts = ", ".join(f"{sum(b.verdict == v for b in report.boundaries)} {v}" for v in sorted(verdicts))
        console.print(f"[green]OK[/]: no resume looks broken ({counts})")
    else:
        console.print("[green]OK[/]: every resume is seamless")


def _changes_text(changes) -> str:
    """A history event's changes as a person reads them: 'batch 16 -> 8, lr0 0.002 -> 0.003'."""
    if not changes:
        return ""
    if isinstance(changes, dict):  # {"train_args.device": [old, new]}
        return ", ".join(
            f"{k} {v[0]} -> {v[1]}" if isinstance(v, list) and len(v) == 2 else f"{k} {v}" for k, v in changes.items()
        )
    parts = []
    for c in changes if isinstance(changes, list) else [changes]:
        if isinstance(c, dict) and "field" in c:
            parts.append(f"{c['field']} {c.get('from')} -> {c.get('to')}")
        else:
            parts.append(str(c))
    return ", ".join(parts)
