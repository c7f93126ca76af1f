"""The error every layer raises for a configuration problem (a leaf module: config, the
vendor clients and the engine all raise it without importing one another)."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """A configuration problem, located as file / sync / field."""

    def __init__(self, file: str | Path, message: str, sync: str | None = None, field: str | None = None):
        self.file, self.sync, self.field, self.message = str(file), sync, field, message
        where = [self.file]
        if sync:
            where.append(f"sync '{sync}'")
        if field:
            where.append(field)
        super().__init__(f"{': '.join(where)}: {message}")
