"""A vendor type as it is written on the wire: plain data, read when a config is checked.

The conversion itself (pandas, a whole column at a time) is :mod:`connector.coerce`, loaded
only when a column is coerced — so reading a config, parsing the DAGs or ``usersync --help``
never load pandas or numpy.
"""

from __future__ import annotations

import dataclasses
from typing import Any



@dataclasses.dataclass(frozen=True)
class Coercer:
    """How one vendor type is written on the wire.

    ``fmt`` is a strftime pattern for datetime/date; ``%3f`` stands for milliseconds.
    ``item`` is the element kind of a list. Limits are checked while coercing so that an
    oversize value rejects its user before anything is sent. The ``repr`` is part of a
    sync's remembered mapping (``connector.mapping``): a field added here is a change of
    every attribute's wire spec.
    """

    kind: str
    fmt: str | None = None
    item: str = "string"
    max_chars: int | None = None
    max_bytes: int | None = None
    max_items: int | None = None
    bool_as_int: bool = False

    @property
    def numeric(self) -> bool:
        return self.kind in ("long", "double")

    def __call__(self, s: Any, label: str) -> tuple[Any, Any]:
        """(values, errors) of a pandas Series: :func:`connector.coerce.column`."""
        from connector import coerce  # pandas, only once a column is coerced

        return coerce.column(self, s, label)
