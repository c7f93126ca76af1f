"""One hook class per vendor connection type (Airflow needs a class to name in provider info).

The hook only resolves a connection into (credentials, settings, base_url) with the
vendor's own ``from_connection``; the engine does the same through ``connector.connections``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from connector import connections, vendors
from connector.airflow.provider import available_vendors, conn_type, hook_class_name


class UsersyncHook(BaseHook):
    vendor: str = ""
    conn_name_attr = "conn_id"
    default_conn_name = "usersync_default"
    conn_type = ""
    hook_name = "usersync"

    def __init__(self, conn_id: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.conn_id = conn_id or self.default_conn_name

    def get_conn(self) -> tuple[dict[str, str], dict[str, Any], str | None]:
        return vendors.get(self.vendor).from_connection(connections.get(self.conn_id))


for _name in available_vendors():
    globals()[hook_class_name(_name)] = type(hook_class_name(_name), (UsersyncHook,), {
        "vendor": _name, "conn_type": conn_type(_name), "default_conn_name": f"{conn_type(_name)}_default",
        "hook_name": f"usersync: {_name}", "__module__": __name__,
    })
