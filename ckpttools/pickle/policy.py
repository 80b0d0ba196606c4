"""THE safety policy: which globals a checkpoint's pickle may name, and what every other one means.

One exact table, ``ALLOWED`` (its data in ``allowlist.py``): (module, name) -> why loading it is safe.  No
prefixes, no wildcards.  Every reader and every command asks ``judge`` (through ``judge_scans``); nothing
else in the package decides.

For a reference that is not on the table:

* the pickle **calls** it (REDUCE / INST / OBJ, or through an allowed function that calls its argument):
  **dangerous** -- ``torch.load(weights_only=False)`` would run it with the file's arguments;
* it belongs to a module whose import or use is an attack (``os``, ``subprocess``, ``builtins`` other than
  the allowed types, ...), or its dotted name walks through such a module or a dunder: **dangerous**;
* it is only **constructed** (NEWOBJ, the way pickled ``nn.Module``s and dataclasses appear) or only
  **referenced**: **code** -- a warning naming the library the file needs; read here as an inert placeholder.

Arguments matter where they decide safety: ``copyreg._reconstructor(cls, base, state)`` runs
``base.__init__`` unless ``base`` is ``object``; ``torch._tensor._rebuild_from_type_v2(func, ...)`` calls
``func``; ``_codecs.encode`` is allowed only for text encodings.  Whatever the scan could not follow (EXT
codes, names computed at load time, BUILD on a global, an opcode stream that breaks off) is dangerous: a
file that cannot be shown safe is not called safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckpttools.objects import Reference
from ckpttools.pickle.allowlist import ALLOWED, DANGEROUS_MODULES
from ckpttools.pickle.scan_model import CALLED, CONSTRUCTED, Call, Global, PickleScan

ALLOWED_STATUS, CODE, DANGEROUS = "allowed", "code", "dangerous"


@dataclass(frozen=True)
class Judgement:
    reference: str  # "module.name", or "<pickle>" for what cannot be tied to one name
    status: str  # allowed | code | dangerous
    uses: tuple[str, ...]  # called / constructed / referenced
    reason: str  # allowed: why it is safe; code: what it needs; dangerous: what loading would do


def is_dangerous_name(ref: Reference) -> bool:
    """A reference to a dangerous module, or a dotted name that walks through one or through a dunder."""
    parts = ref.module.split(".") + ref.name.split(".")
    if any(p.startswith("__") and p.endswith("__") and p not in ("__newobj__",) for p in ref.name.split(".")):
        return True
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in DANGEROUS_MODULES:
            return True
    attr_parts = ref.name.split(".")[:-1]  # `torch` + `serialization.pickle.loads` passes through `pickle`
    return any(p in DANGEROUS_MODULES for p in attr_parts)


def judge(scan: PickleScan) -> list[Judgement]:
    """One judgement per reference of the scan, plus one per thing the scan could not follow."""
    uses = {ref: set(how) for ref, how in scan.uses.items()}
    extra: list[Judgement] = []
    for call in scan.calls:
        rule = ARGUMENT_RULES.get((call.ref.module, call.ref.name))
        if rule is not None:
            extra.extend(rule(call, uses))
    out = []
    for ref, how in uses.items():
        out.append(_judge_reference(ref, how))
    out.extend(extra)
    out.extend(Judgement("<pickle>", DANGEROUS, (), problem) for problem in scan.problems)
    if scan.error:
        out.append(
            Judgement(
                "<pickle>",
                DANGEROUS,
                (),
                f"the opcode stream could not be followed to its end ({scan.error}): the pickle cannot be shown safe",
            )
        )
    return out


def _judge_reference(ref: Reference, how: set[str]) -> Judgement:
    uses = tuple(sorted(how))
    reason = ALLOWED.get((ref.module, ref.name))
    if reason is not None:
        return Judgement(ref.qualname, ALLOWED_STATUS, uses, reason)
    if CALLED in how:
        return Judgement(
            ref.qualname,
            DANGEROUS,
            uses,
            f"torch.load(weights_only=False) would call {ref.qualname}(...) with arguments from the file",
        )
    if is_dangerous_name(ref):
        verb = "build" if CONSTRUCTED in how else "import"
        return Judgement(
            ref.qualname,
            DANGEROUS,
            uses,
            f"torch.load(weights_only=False) would {verb} "
            f"{ref.qualname}, from a module a checkpoint has no reason to name",
        )
    library = ref.module.split(".")[0]
    what = "builds an object of" if CONSTRUCTED in how else "names"
    return Judgement(
        ref.qualname,
        CODE,
        uses,
        f"{what} {ref.qualname}: needs the {library!r} library to load "
        "with torch.load(weights_only=False); read here as an inert placeholder",
    )


# ---- argument rules: allowed callables whose safety depends on what they are given ---------------------------


def _global(arg) -> Reference | None:
    return arg.ref if isinstance(arg, Global) else None


def _reconstructor(call: Call, uses: dict) -> list[Judgement]:
    out = []
    cls = _global(call.args[0]) if call.args else None
    if cls is not None:
        uses.setdefault(cls, set()).add(CONSTRUCTED)
    base = _global(call.args[1]) if len(call.args) > 1 else None
    if base != Reference("builtins", "object"):
        name = base.qualname if base else "a value computed at load time"
        out.append(
            Judgement(
                name,
                DANGEROUS,
                (CALLED,),
                f"copyreg._reconstructor with base {name} would run {name}.__init__ on the file's state",
            )
        )
    return out


def _newobj(call: Call, uses: dict) -> list[Judgement]:
    cls = _global(call.args[0]) if call.args else None
    if cls is not None:
        uses.setdefault(cls, set()).add(CONSTRUCTED)
        return []
    return [
        Judgement("copyreg.__newobj__", DANGEROUS, (CALLED,), "copyreg.__newobj__ of a class computed at load time")
    ]


def _rebuild_from_type(call: Call, uses: dict) -> list[Judgement]:
    func = _global(call.args[0]) if call.args else None
    if func is None:
        return [
            Judgement(
                "torch._tensor._rebuild_from_type_v2",
                DANGEROUS,
                (CALLED,),
                "_rebuild_from_type_v2 would call a function computed at load time",
            )
        ]
    uses.setdefault(func, set()).add(CALLED)
    new_type = _global(call.args[1]) if len(call.args) > 1 else None
    if new_type is not None and new_type != Reference("torch", "Tensor"):
        uses.setdefault(new_type, set()).add(CONSTRUCTED)
    return []


TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})


def _codecs_encode(call: Call, uses: dict) -> list[Judgement]:
    encoding = call.args[1] if len(call.args) > 1 else "utf-8"
    if isinstance(encoding, str) and encoding.lower() in TEXT_ENCODINGS and len(call.args) <= 3:
        return []
    return [
        Judgement(
            "_codecs.encode",
            DANGEROUS,
            (CALLED,),
            "_codecs.encode with an encoding that is not plain text (codecs can run code)",
        )
    ]


ARGUMENT_RULES: dict[tuple[str, str], Callable[[Call, dict], list[Judgement]]] = {
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("_codecs", "encode"): _codecs_encode,
}


def markdown_table() -> str:
    """The allow-list as a markdown table (docs/security.md embeds it; a test checks it is current)."""
    rows = ["| module | name | why it is safe |", "|---|---|---|"]
    rows += [f"| `{m}` | `{n}` | {reason} |" for (m, n), reason in sorted(ALLOWED.items())]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
