"""Lightning: its checkpoint keeps the weights under ``state_dict`` and one optimizer state per optimizer in
the list ``optimizer_states`` (the first is the one checked against the weights)."""

from __future__ import annotations

from typing import Any

from ckpttools import layouts as L
from ckpttools.trainers.base import TrainerRules


class LightningRules(TrainerRules):
    layout = L.LIGHTNING
    title = "Lightning"

    def optimizer_state(self, tree: dict, key: str) -> Any:
        states = tree.get(key)
        if isinstance(states, list):
            return states[0] if states else None
        return states

    def sections(self, tree: Any) -> dict[str, Any] | None:
        if not isinstance(tree, dict):
            return None
        return {"model": tree.get("state_dict"), "optimizer": tree.get("optimizer_states")}


RULES = LightningRules()
