"""Vendor registry: one folder per vendor.

Each ``connector/vendors/<vendor>/`` holds ``settings.py`` (what the vendor documents:
endpoints, limits, codes, types), ``client.py`` (the sans-IO contract of
:mod:`connector.vendors.base`), ``emulator.py`` (the strict stand-in served by
:mod:`connector.vendors.emulator`) and a ``README.md``. A production run loads only the
clients (:func:`get`); an emulator is loaded only where one serves (:func:`emulator_module`: the
tests, the demo, the bench and ``usersync emulators``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from connector.vendors.base import Vendor

# the vendor types a syncs.yaml may name, each a package under connector.vendors
NAMES = ("dfinery", "engagelab", "jiguang", "moengage", "tencent_im")


def names() -> list[str]:
    return sorted(NAMES)


def get(name: str) -> type[Vendor]:
    """The client class of a vendor."""
    return importlib.import_module(f"connector.vendors.{name}.client").Client


def emulator_module(name: str) -> ModuleType:
    """A vendor's emulator module (``Emulator``, ``PORT``, ``emulator(specs)``)."""
    return importlib.import_module(f"connector.vendors.{name}.emulator")
