"""What a pickle names, as data: a ``Reference`` (module, name) and ``Placeholder``, the inert stand-in for an
object of a class that was never imported.

Kept apart from the unpickler so the tensor model, the writers and the layouts can recognise placeholders
without depending on how pickles are read.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reference:
    """A global a pickle names: ``module`` and ``name`` exactly as written (``name`` may be dotted)."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


class Placeholder:
    """An inert stand-in for an object of a class that was not imported.  Records constructor arguments,
    state, list items and dict items; never runs the real class's code."""

    _reference: Reference = Reference("?", "?")

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_kwargs"] = kwargs
        obj.__dict__["_state"] = None
        obj.__dict__["_items"] = []
        obj.__dict__["_dict_items"] = {}
        return obj

    def __init__(self, *args, **kwargs):
        # reached only when pickle *called* the class (REDUCE), not for NEWOBJ's cls.__new__(cls, *args):
        # remembered so that writing the object back (formats.torchzip) rebuilds it the same way
        self.__dict__["_built_by"] = "call"

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self._dict_items[key] = value

    def append(self, value):
        self._items.append(value)

    def extend(self, values):
        self._items.extend(values)

    def __getattr__(self, name):
        # pickle may look up e.g. `__setstate__` or `extend`; anything else is absent, never computed
        raise AttributeError(name)

    def __reduce__(self):
        raise pickle.PicklingError("placeholders are descriptions and cannot be pickled again")

    @property
    def state(self):
        """The object's recorded state: BUILD state, else constructor arguments."""
        return self._state if self._state is not None else (self._args or None)

    def __repr__(self) -> str:
        return f"<{self._reference.qualname} (not imported)>"


def placeholder_class(ref: Reference) -> type:
    """A new Placeholder subclass that stands for ``ref``."""
    return type(
        ref.name if ref.name.isidentifier() else "Placeholder",
        (Placeholder,),
        {"_reference": ref, "__module__": "ckpttools.placeholder"},
    )


def is_placeholder(obj: Any) -> bool:
    return isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder))
