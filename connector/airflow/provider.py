"""The ``apache_airflow_provider`` entry point: one connection type per vendor.

Built from each vendor's own declarations (``credentials`` are secret, ``settings`` are
not, ``conn_fields`` says which connection field holds which), so a new vendor module
gets its connection form without touching this file. Connection fields mapped to
``extra.<key>`` become declarative ``conn-fields`` (stored in the connection's extra);
those mapped to login / password / host are relabelled standard fields.
"""

from __future__ import annotations

import logging
from typing import Any

from connector import __version__, vendors

log = logging.getLogger("usersync.airflow")
STANDARD_FIELDS = ("host", "port", "login", "password", "schema")


def conn_type(vendor: str) -> str:
    return f"usersync_{vendor}"


def hook_class_name(vendor: str) -> str:
    return "".join(p.capitalize() for p in vendor.split("_")) + "Hook"


def _label(name: str) -> str:
    words = name.replace("_", " ")
    return words[:1].upper() + words[1:]


def connection_type(vendor: str) -> dict[str, Any]:
    """The provider-info entry of one vendor's connection type."""
    cls = vendors.get(vendor)
    fields: dict[str, Any] = {}
    relabel: dict[str, str] = {}
    for name, source in cls.conn_fields.items():
        secret = name in cls.credentials
        if source.startswith("extra."):
            schema: dict[str, Any] = {"type": ["string", "null"]}
            if secret:
                schema["format"] = "password"
            fields[source[6:]] = {"label": _label(name), "schema": schema,
                                  "description": f"{cls.name} {'credential (secret)' if secret else 'setting'}"}
        else:
            relabel[source] = _label(name)
    fields["base_url"] = {"label": "Base URL", "schema": {"type": ["string", "null"], "format": "url"},
                          "description": f"Leave empty for {cls.default_base_url} (set it for an emulator or proxy)"}
    return {
        "connection-type": conn_type(vendor),
        "hook-class-name": f"connector.airflow.hooks.{hook_class_name(vendor)}",
        "hook-name": f"usersync: {cls.name}",
        "conn-fields": fields,
        "ui-field-behaviour": {
            "hidden-fields": [f for f in STANDARD_FIELDS if f not in relabel],
            "relabeling": relabel,
            "placeholders": {},
        },
    }


def available_vendors() -> list[str]:
    """Vendors whose module imports (one being written must not hide the others)."""
    ok = []
    for name in vendors.names():
        try:
            vendors.get(name)
        except Exception as e:  # noqa: BLE001 - a broken vendor module is reported, not fatal
            log.warning("usersync vendor %s not available: %s", name, e)
            continue
        ok.append(name)
    return ok


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "usersync",
        "name": "usersync",
        "description": "Reverse ETL of user attributes to engagement platforms (one connection type per vendor).",
        "versions": [__version__],
        "connection-types": [connection_type(v) for v in available_vendors()],
    }
