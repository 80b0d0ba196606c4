"""The layout's rules, checked: no import cycles, no function-level imports to dodge one, lean start-up, one
policy that every reader shares."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

from ckpttools.pickle.policy import ALLOWED
from ckpttools.pickle.unpickler import IMPLEMENTATIONS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ckpttools"
LAZY_BY_DESIGN = {"ckpttools.cli", "ckpttools"}  # the CLI imports each command when it runs (start-up time)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, tuple[set[str], set[str]]]:
    """module -> (top-level ckpttools imports, function-level ckpttools imports)"""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top, nested = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckpttools"):
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                (top if node in tree.body else nested).update(names)
        out[_module_name(path)] = (top, nested)
    return out


def test_no_import_cycles_and_no_function_level_imports_to_break_one():
    graph = _imports()
    modules = set(graph)
    edges = {m: {t for t in graph[m][0] if t in modules and t != m} for m in modules}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in edges[m]:
            assert state.get(t) != 1, "import cycle: " + " -> ".join(stack + [m, t])
            if t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
    nested = {m: sorted(n & modules) for m, (_, n) in graph.items() if m not in LAZY_BY_DESIGN and n & modules}
    assert not nested, f"function-level imports of ckpttools modules: {nested}"


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_start_up_imports_only_what_the_command_needs():
    cli = _loaded_after("import ckpttools.cli")
    assert not {"torch", "numpy", "h5py", "rich", "ckpttools.formats"} & cli
    verify = _loaded_after("import ckpttools.commands.verify")
    assert "torch" not in verify and "h5py" not in verify  # verify reads every format without torch
    # fuse-train's --help, data check and the option errors do not import torch (a run imports it when it starts)
    fuse = _loaded_after("import fuse_train.cli")
    assert not {"torch", "matplotlib", "tensorboard", "fuse_train.trainer"} & fuse


def test_one_policy_every_implementation_is_allowed_and_every_entry_has_a_reason():
    assert set(IMPLEMENTATIONS) <= set(ALLOWED)
    assert all(isinstance(reason, str) and len(reason) > 10 for reason in ALLOWED.values())
    assert not [key for key in ALLOWED if "*" in key[0] or "*" in key[1]]


def test_security_page_carries_the_current_allow_list():
    from ckpttools.pickle.policy import markdown_table

    assert (ROOT / "docs" / "security.md").read_text().endswith(markdown_table())


def test_the_scan_keeps_arguments_of_every_call_the_policy_judges_by_them():
    from ckpttools.objects import Reference
    from ckpttools.pickle.policy import ARGUMENT_RULES
    from ckpttools.pickle.scan import ARGUMENT_CHECKED

    assert {Reference(m, n) for m, n in ARGUMENT_RULES} == ARGUMENT_CHECKED


TRAINER_NAMES = re.compile(r"fuse.?train|ultralytics|lightning|yolofuse|layout ==", re.IGNORECASE)


def test_commands_hold_no_trainer_knowledge():
    """What a trainer does with its checkpoints lives in its module under ckpttools/trainers/ (issue 28): the
    commands ask the registry, so adding a trainer never means editing a command."""
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((PACKAGE / "commands").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if TRAINER_NAMES.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_every_trainer_module_is_registered_once_under_a_known_layout():
    from ckpttools import layouts as L
    from ckpttools.trainers.base import TrainerRules
    from ckpttools.trainers.registry import BY_LAYOUT, TRAINERS

    modules = {p.stem for p in (PACKAGE / "trainers").glob("*.py")} - {"__init__", "base", "registry"}
    modules -= {m for m in modules if m.endswith("_schema")}
    assert {type(r).__module__.rsplit(".", 1)[1] for r in TRAINERS} == modules
    assert len(BY_LAYOUT) == len(TRAINERS) and all(isinstance(r, TrainerRules) for r in TRAINERS)
    assert set(BY_LAYOUT) <= set(L.LAYOUTS)


def test_convert_writes_every_target_through_its_format_module():
    """Each writable format holds its writer beside its reader behind one entry (formats/base.py WriteRequest);
    convert picks it from one table and calls no format's own write functions (issue 28)."""
    from ckpttools.commands import convert
    from ckpttools.formats.base import WriteRequest

    assert set(convert.WRITERS) == {convert.PT, convert.H5, convert.SAFETENSORS, convert.DCP_TARGET}
    for module in convert.WRITERS.values():
        params = list(inspect.signature(module.write_converted).parameters.values())
        assert len(params) == 2 and params[1].annotation in (WriteRequest, "WriteRequest"), module.__name__
    source = (PACKAGE / "commands" / "convert.py").read_text()
    assert not re.search(r"\.(write_file|write_hdf5|write_safetensors|write_single|write_sharded)\(", source)


def test_formats_read_containers_only_and_sit_below_layouts_trainers_and_datasets():
    # reading a zip must not pull in what checkpoints mean (layouts), who wrote them (trainers) or dataset code
    graph = _imports()
    modules = set(graph)
    above = (
        "ckpttools.layouts",
        "ckpttools.trainers",
        "ckpttools.datasets",
        "ckpttools.commands",
        "ckpttools.yolo_data",
    )

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()][0] & modules:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    for m in sorted(m for m in modules if m.startswith("ckpttools.formats")):
        wrong = sorted(t for t in reach(m) if t.startswith(above))
        assert not wrong, f"{m} reaches {wrong}"
