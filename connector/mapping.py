"""The mapping a sync last delivered under, and what a run must do when it changed.

Per attribute, a *spec* holds what its wire value depends on: the source column, the
vendor type and the coercer that writes it, the update rule and the NULL policy. The
specs of the last run whose deliveries were recorded live in ``sync_mappings``; a run
compares them with the config's (one small query) and, when they differ, reads every
user once and diffs each against the delivered snapshot: an added attribute is absent
from every payload, so it is sent (an increase from zero: its current value, once); a
retyped one is compared by its wire text, so only the users whose representation moved
get it; a removed one leaves the payloads (and is unset only where ``unset_removed``
asks). Users whose delivery is not recorded keep their old payload, so a crashed or
partial backfill leaves the next run exactly what is still to send.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from connector import vendors
from connector.vendors.base import Op


def specs(spec) -> dict[str, dict[str, str]]:
    """attribute -> what its wire value depends on, for a sync's mapping (a ``SyncSpec``)."""
    cls = vendors.get(spec.vendor.type)
    return {a.attribute: {"column": a.column, "type": a.type.lower(), "wire": repr(cls.types[a.type.lower()]),
                          "rule": cls.rules[a.rule], "null": a.null} for a in spec.mapping}


def digest(spec) -> str:
    """A short name of the mapping (the DAG's docs and the plan's log show it)."""
    return hashlib.sha256(json.dumps(specs(spec), sort_keys=True).encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class MappingChange:
    """How the config's mapping differs from the one last delivered."""

    added: tuple[str, ...]
    changed: dict[str, tuple[str, ...]]  # attribute -> the spec fields that differ
    removed: tuple[str, ...]
    unset: frozenset[str]  # removed attributes to unset at the vendor (``unset_removed``)
    mapping: dict[str, dict[str, str]]  # the specs now
    since_run: int | None = None  # the run the delivered mapping last changed in (None: nothing remembered)
    since: Any = None

    @property
    def strict(self) -> frozenset[str]:
        """Attributes whose old wire values may be equal in Python but not on the wire (3 vs 3.0, true vs 1)."""
        return frozenset(self.changed)

    def strip(self, before: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, Op, Any]], list[str]]:
        """A user's delivered payload without the removed attributes, the unset ops asked for
        them, and the removed attributes it held."""
        dropped = [a for a in self.removed if a in before]
        if not dropped:
            return before, [], dropped
        kept = {a: v for a, v in before.items() if a not in self.removed}
        return kept, [(a, Op.UNSET, None) for a in dropped if a in self.unset and before[a] is not None], dropped

    def data_changed(self, before: dict[str, Any], after: dict[str, Any]) -> bool:
        """Whether the payload moved on an attribute the mapping change did not touch: what the
        blast-radius guard weighs (an added or retyped attribute reaching everyone is deliberate)."""
        return any(after.get(a) != v for a, v in before.items() if a not in self.changed)

    def as_json(self) -> dict[str, Any]:
        return {"added": list(self.added), "changed": {a: list(f) for a, f in self.changed.items()},
                "removed": list(self.removed), "unset": sorted(self.unset), "mapping": self.mapping}

    def lines(self, per_attribute=None, dropped=None) -> list[str]:
        """What changed, attribute by attribute (with how many users each sends to, when known)."""
        def users(a: str) -> str:
            return f": {per_attribute.get(a, 0)} user(s) to send" if per_attribute is not None else ""

        out = [f"  added    {a}{users(a)}" for a in self.added]
        out += [f"  changed  {a} ({', '.join(f)}){users(a)}" for a, f in self.changed.items()]
        for a in self.removed:
            held = f" ({dropped.get(a, 0)} user(s) held it)" if dropped is not None else ""
            out.append(f"  removed  {a}: " + (f"unset at the vendor (unset_removed){users(a)}" if a in self.unset
                                               else f"no longer synced; the vendor keeps its values{held}"))
        return out

    def describe(self) -> str:
        parts = [f"{k} {', '.join(v)}" for k, v in (("added", self.added), ("changed", list(self.changed)),
                                                    ("removed", self.removed)) if v]
        return "; ".join(parts)


def compare(spec, stored: dict[str, tuple[dict[str, str], int | None, Any]]) -> MappingChange | None:
    """The change from the ``stored`` mapping (``state.get_mapping``) to the config's, or None."""
    now = specs(spec)
    old = {a: s for a, (s, _, _) in stored.items()}
    if now == old:
        return None
    last = max(stored.values(), key=lambda v: (v[1] or 0), default=(None, None, None))
    removed = tuple(a for a in old if a not in now)
    return MappingChange(
        added=tuple(a for a in now if a not in old),
        changed={a: tuple(f for f in now[a] if now[a][f] != old[a].get(f)) for a in now if a in old and now[a] != old[a]},
        removed=removed, unset=frozenset(a for a in removed if a in spec.unset_removed), mapping=now,
        since_run=last[1], since=last[2])
