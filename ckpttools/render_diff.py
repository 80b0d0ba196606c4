"""``ckpt diff``'s terminal view: the verdict, the tensors that changed most (names wrapped at their dots to fit
the terminal's width, numbers in a fixed column), counters apart from weights, and metadata changes."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ckpttools.render import middle_cut, print_json, print_trimmed, stdout
from ckpttools.report import counted


def show_diff(report, as_json: bool, top: int = 20) -> None:
    """The report as one JSON object (``--json``) or as the terminal view, on stdout."""
    if as_json:
        print_json(report.to_dict(top))
    else:
        render_diff(report, stdout(), top)


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
        _render_changed(report, console, top)
    elif report.same:
        console.print(
            f"{report.same} tensors, all bitwise identical"
            + (f" ({report.equal_by_crc} equal by CRC32, not read; --exact reads them)" if report.equal_by_crc else "")
        )
    if report.metadata:
        table = Table("field", "A", "B", title="metadata that differs", title_justify="left")
        table.columns[0].overflow = "fold"
        for m in report.metadata[: max(top, 50)]:
            table.add_row(escape(m["field"]), escape(middle_cut(m["a"])), escape(middle_cut(m["b"])))
        print_trimmed(console, table)
    if report.ignored_metadata:
        console.print(f"[dim]differ as between any two saves (not judged): {', '.join(report.ignored_metadata)}[/]")
    console.print(f"verdict: [{colour}]{report.verdict}[/]")


NUMBERS = 38  # width of the numbers before a tensor's name in `ckpt diff`; the name takes the rest of the line


def _render_changed(report, console: Console, top: int) -> None:
    """One row per tensor: the numbers, then the whole name (wrapped at dots when the line is too narrow, never
    inside a component); counters (integer scalars such as num_batches_tracked) summarised in one line."""
    counters = [d for d in report.changed if _is_counter(d)]
    tensors = [d for d in report.changed if not _is_counter(d)]
    console.print(
        f"[bold]tensors that differ[/]: {len(report.changed):,} ({report.same:,} identical), largest relative "
        "change first",
        highlight=False,
    )
    width = max(console.width, 40)
    rows = []
    for d in tensors[:top]:
        if d.note == "shape changed":
            numbers = f"  shape {list(d.shape_a)} -> {list(d.shape_b)}"
        elif d.note == "dtype changed":
            numbers = f"  dtype {d.dtype_a} -> {d.dtype_b}"
        elif d.note:
            numbers = f"  {d.note}"
        else:
            numbers = f"{d.rel_l2:>8.3g} {d.max_abs:>9.3g} {d.mean_abs:>9.3g} {d.outside:>8,}"
        name = f"{d.section}/{d.name}"
        if d.nonfinite_a or d.nonfinite_b:
            name += f"  (NaN/Inf {d.nonfinite_a}/{d.nonfinite_b})"
        rows.append((numbers, name))
    # numbers and name on one line when every name fits beside the numbers; otherwise each name on a line of its
    # own (whole wherever the terminal is wide enough for it) with its numbers beneath
    side_by_side = all(len(n) <= NUMBERS and NUMBERS + 2 + len(name) <= width for n, name in rows)
    header = f"{'rel L2':>8} {'max abs':>9} {'mean abs':>9} {'outside':>8}"
    if rows:
        console.print(f"[dim]{header}  tensor[/]" if side_by_side else f"[dim]tensor\n{header}[/]", highlight=False)
    for numbers, name in rows:
        lines = [f"{numbers:<{NUMBERS}}  {name}"] if side_by_side else [*_name_lines(name, width), numbers]
        for line in lines:
            console.print(line, markup=False, highlight=False)
    if len(tensors) > top:
        console.print(f"... and {len(tensors) - top:,} more (--top N shows more; --json lists them all)")
    if counters:
        largest = max(d.max_abs for d in counters)
        scalars = counted(len(counters), "integer scalar")
        console.print(
            f"counters: {scalars} (num_batches_tracked, ...) differ, by up to {largest:g}",
            markup=False,
            highlight=False,
        )


def _is_counter(d) -> bool:
    kinds = ("int", "uint", "bool")
    return (
        not d.note
        and str(d.dtype_a or "").startswith(kinds)
        and tuple(d.shape_a or ()) in ((), (1,))
        and tuple(d.shape_b or ()) in ((), (1,))
    )


def _name_lines(name: str, width: int) -> list[str]:
    """``name`` whole on one line if it fits ``width``; otherwise wrapped after a dot (or slash) onto lines
    indented by two (a component longer than a line is kept whole: a name is never cut inside a component)."""
    if len(name) <= width:
        return [name]
    lines, current = [], ""
    for part in _dot_parts(name):
        room = width - (2 if lines else 0)
        if current and len(current) + len(part) > room:
            lines.append(current)
            current = ""
        current += part
    lines.append(current)
    return [lines[0]] + ["  " + line for line in lines[1:]]


def _dot_parts(name: str) -> list[str]:
    """'model/bb.p3.0.weight' -> ['model/', 'bb.', 'p3.', '0.', 'weight']: the places a name may wrap."""
    parts, current = [], ""
    for ch in name:
        current += ch
        if ch in "./":
            parts.append(current)
            current = ""
    if current:
        parts.append(current)
    return parts


# blocked field -> what to do instead of allowing the change
