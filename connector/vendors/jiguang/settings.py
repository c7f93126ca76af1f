"""Jiguang Operation Growth: what its docs fix (``seeds/jiguang-growth-set-user-attributes.txt``, VENDORS.md §2) —
endpoints, limits, error codes and attribute types. The rules around them: README.md beside this file."""

from __future__ import annotations

import re

from connector.vendors.base import Limit
from connector.wire import Coercer

BASE_URL = "https://growth.jiguang.cn"
PATH = "/smartop/api/v1/user/attribute"
LIMIT = Limit(100, 1.0)  # QPS <= 100 [doc]
DATETIME = "%Y-%m-%d %H:%M:%S"  # yyyy-MM-dd HH:mm:ss
TYPES = {
    "string": Coercer("string"),
    "number": Coercer("double"),
    "long": Coercer("long"),
    "double": Coercer("double"),
    "boolean": Coercer("boolean", bool_as_int=True),  # only 0/1 are accepted
    "bool": Coercer("boolean", bool_as_int=True),
    "datetime": Coercer("datetime", fmt=DATETIME),
    "list": Coercer("list", item="string"),
}
# rule names a mapping may use (Jiguang's console names, plus the engine's) -> engine rule
RULES = {"once": "once", "overwrite": "set", "set": "set", "accumulate": "increase", "increase": "increase",
         "append": "append"}
# engine rule -> the console rule the emulator applies
CONSOLE_RULE = {"once": "once", "set": "overwrite", "increase": "accumulate", "append": "append"}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # attribute names: lowercase letters, digits, underscore
MAX_CUID = 2**63 - 1  # a Java long

OK = 0
STOP = {4009: "API authentication failed"}
REJECT = {  # permanent for this user's payload: recorded, retried next run
    40002: "invalid business parameter",
    40003: "invalid CUID (not in this project)",
    40007: "CUID is empty",
    40009: "user attribute value cannot be empty",
    40010: "user attribute does not exist",
}
RETRYABLE = {-1: "internal server error"}  # an explicit error: nothing was applied
THROTTLED = {2002: "API call frequency exceeds the limit"}  # JPush's code, with HTTP 429
def console_rule(rule: str) -> str:
    """The console rule (once/overwrite/accumulate/append) a mapping rule name stands for."""
    return CONSOLE_RULE[RULES[rule]]
