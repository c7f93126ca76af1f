"""Vendor registry: one module per vendor, each holding client, settings and emulator rules."""

from __future__ import annotations

import importlib

from connector.vendors.base import Vendor

# vendor type (as written in syncs.yaml) -> module under connector.vendors
MODULES = {
    "dfinery": "dfinery",
    "engagelab": "engagelab",
    "jiguang": "jiguang",
    "tencent_im": "tencent_im",
    "moengage": "moengage",
}


def names() -> list[str]:
    return sorted(MODULES)


def module(name: str):
    return importlib.import_module(f"connector.vendors.{MODULES[name]}")


def get(name: str) -> type[Vendor]:
    """The client class of a vendor."""
    return module(name).Client
