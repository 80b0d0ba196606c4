"""Rich views and JSON output of reports; errors to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from ckpttools.report import JSON_PER_CODE, Report

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def stdout() -> Console:
    return Console(highlight=False)


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)  # one-line errors stay one line


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_verify(report: Report, console: Console, strict: bool = False) -> None:
    facts = report.facts
    head = f"{report.path}: {report.format}, layout {report.layout}"
    extras = [
        f"{k.replace('_', ' ')} {facts[k]:,}" if isinstance(facts[k], int) else f"{k.replace('_', ' ')} {facts[k]}"
        for k in ("epoch", "step", "parameter_count")
        if facts.get(k) is not None
    ]
    console.print(head + (" (" + ", ".join(extras) + ")" if extras else ""), markup=False)
    if report.findings:
        # severity in a narrow column; code and place on one line, the message below, wrapped in its column:
        # readable at 80 columns, where a four-column table squeezes messages into a sliver
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=7, no_wrap=True)
        grid.add_column(overflow="fold")
        kept, left = report.shown()
        for f in sorted(kept, key=lambda f: ("error", "warning", "info").index(f.severity)):
            where = f" [dim]at {escape(f.where)}[/]" if f.where else ""
            grid.add_row(f"[{STYLE[f.severity]}]{f.severity}[/]", f"[bold]{f.code}[/]{where}\n{escape(f.message)}")
        console.print(grid)
        for code, n in left.items():
            console.print(
                f"[dim]... and {n:,} more {escape(code)} finding(s) like these (--json lists up to "
                f"{JSON_PER_CODE} of each)[/]"
            )
    n_err, n_warn = len(report.errors), len(report.warnings)
    verdict = "OK" if report.ok(strict) else "FAILED"
    colour = "green" if report.ok(strict) else "bold red"
    console.print(
        f"[{colour}]{verdict}[/]: {n_err} error(s), {n_warn} warning(s)"
        + (" (--strict: warnings fail)" if strict and n_warn and not n_err else "")
    )


def render_inspect(summary: dict, console: Console) -> None:
    console.print(f"[bold]{summary['path']}[/]  format {summary['format']}, layout {summary['layout']}")
    facts = [(k, summary.get(k)) for k in ("epoch", "step", "best_fitness", "parameter_count", "tensors")]
    console.print(
        "  "
        + "  ".join(
            f"{k.replace('_', ' ')}: {v:,}"
            if isinstance(v, int) and not isinstance(v, bool)
            else f"{k.replace('_', ' ')}: {v}"
            for k, v in facts
            if v is not None
        )
    )
    if summary.get("bytes_by_dtype"):
        console.print(
            "  bytes by dtype: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in summary["bytes_by_dtype"].items())
        )
    if summary.get("devices"):
        console.print("  saved on: " + ", ".join(f"{k} ({v} storages)" for k, v in summary["devices"].items()))
    tree = Tree("keys")
    _add(tree, summary["keys"])
    console.print(tree)
    if summary.get("run_arguments"):
        table = Table("argument", "value", title="run arguments", title_justify="left")
        for k, v in summary["run_arguments"].items():
            table.add_row(k, str(v))
        console.print(table)
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
        console.print(f"[dim]... and {n:,} more {escape(code)} problem(s) like these[/]")


def _add(node: Tree, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict):
                _add(node.add(escape(str(k))), v)
            else:
                node.add(f"{escape(str(k))}: [dim]{escape(str(v))}[/]")
    else:
        node.add(str(value))


def render_diff(report, console: Console, top: int = 20) -> None:
    colour = {"identical": "green", "within_tolerance": "green", "different": "bold red"}[report.verdict]
    console.print(f"A: {escape(report.a)}\nB: {escape(report.b)}")
    for note in report.notes:
        console.print(f"[cyan]note[/]: {escape(note)}")
    for label, items in (("only in A", report.only_in_a), ("only in B", report.only_in_b)):
        if items:
            console.print(
                f"[bold]{label}[/] ({len(items)}): "
                + ", ".join(
                    f"{escape(i['section'])}/{escape(i['name'])} {i['dtype']} {i['shape']}" for i in items[:top]
                )
                + (" ..." if len(items) > top else "")
            )
    if report.changed:
        table = Table(
            title=f"tensors that differ ({len(report.changed)}; {report.same} identical)", title_justify="left"
        )
        for col in ("section", "name", "change", "max abs", "mean abs", "rel L2", "outside tol", "NaN/Inf A/B"):
            table.add_column(col, overflow="fold")
        for d in report.changed[:top]:
            change = d.note or "values"
            if d.note == "shape changed":
                change = f"shape {list(d.shape_a)} -> {list(d.shape_b)}"
            elif d.note == "dtype changed":
                change = f"dtype {d.dtype_a} -> {d.dtype_b}"
            table.add_row(
                d.section,
                escape(d.name),
                change,
                f"{d.max_abs:.3g}",
                f"{d.mean_abs:.3g}",
                f"{d.rel_l2:.3g}",
                str(d.outside),
                f"{d.nonfinite_a}/{d.nonfinite_b}",
            )
        console.print(table)
    elif report.same:
        console.print(
            f"{report.same} tensors, all bitwise identical"
            + (f" ({report.equal_by_crc} equal by CRC32, not read; --exact reads them)" if report.equal_by_crc else "")
        )
    if report.metadata:
        table = Table("field", "A", "B", title="metadata", title_justify="left")
        for m in report.metadata[: max(top, 50)]:
            table.add_row(escape(m["field"]), escape(str(m["a"])), escape(str(m["b"])))
        console.print(table)
    if report.ignored_metadata:
        console.print(f"[dim]differ as between any two saves (not judged): {', '.join(report.ignored_metadata)}[/]")
    console.print(f"verdict: [{colour}]{report.verdict}[/]")


# blocked field -> what to do instead of allowing the change
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
        table.add_row(c.field, _short(c.recorded), _short(c.requested), f"[{style[c.status]}]{status}[/]")
    same = [c.field for c in report.checks if c.status == "same"]
    if table.row_count:
        console.print(table)
    if same:
        console.print(f"unchanged: {', '.join(same)}", highlight=False)
    for c in report.checks:
        if c.status == "same" and c.note:
            console.print(f"  {c.field}: {c.note}", highlight=False, markup=False)
    for c in report.blocked:
        if c.field in REMEDIES:
            console.print(REMEDIES[c.field].format(requested=c.requested), highlight=False, markup=False)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:28] + "…" + text[-28:]


def render_audit(report, console: Console) -> None:
    """Lineage, then one row per resume boundary: where, what was checked, verdict."""
    console.print(f"[bold]{escape(report.run_dir)}[/]  {report.layout}, {report.epochs} epoch(s) in results.csv")
    for event in report.lineage:
        changes = event.get("changes")
        extra = f" changes {changes}" if changes else ""
        console.print(
            f"  {event.get('date', '?')}  {event.get('event')} at step {event.get('step')}" + escape(extra),
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
        console.print(grid)
    for problem in report.problems:
        console.print(f"[bold red]broken[/] {escape(problem)}")
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    console.print("[green]OK[/]: every resume is seamless" if report.ok else "[bold red]BROKEN[/]: see above")
