"""EngageLab MA: what its docs fix (``seeds/engagelab-ma-set-user-attributes.txt``, VENDORS.md §1) —
endpoints, limits, error codes and attribute types. The rules around them: README.md beside this file."""

from __future__ import annotations

from connector.vendors.base import Limit, Op
from connector.wire import Coercer

REGIONS = {"singapore": "https://ma-api.engagelab.com", "virginia": "https://ma-api-usva.engagelab.com"}
DEFAULT_REGION = "singapore"
PATH = "/v1/user/property"
LIMIT = Limit(100, 1.0)  # requests a second: not published [inferred]; override with vendor.rate_limit
DATETIME = "%Y-%m-%d %H:%M:%S"  # yyyy-MM-dd HH:mm:ss (we send UTC)
TYPES = {
    "string": Coercer("string"),
    "number": Coercer("double"),  # integers and decimals; integral values go out as JSON integers
    "bool": Coercer("boolean"),
    "datetime": Coercer("datetime", fmt=DATETIME),
    "list": Coercer("list", item="string"),
}
# engine op -> the body's ``type``, in the order a change's parts are sent: idempotent
# first; ``remove`` before ``add`` so that an attribute with both is acknowledged only
# when its last part (the add) is, and a half-applied list change is simply redone.
OP_TYPES = {Op.SET: "set", Op.ONCE: "set", Op.UNSET: "delete", Op.REMOVE: "remove", Op.INCREASE: "increase", Op.APPEND: "add"}
# ``delete`` ignores the values, but an empty one is refused (55103) [inferred]: send a placeholder
DELETE_VALUE = True
OK = 0
STOP = {40050: "interface authentication failed", 50031: "invalid project", 50034: "project does not exist",
        50074: "API data source does not exist"}  # nothing can succeed: stop the run
PERMANENT = {40007: "euid is empty", 55004: "business parameters are invalid",
             55102: "invalid user attributes", 55103: "user attribute values cannot be empty"}  # reject the user
