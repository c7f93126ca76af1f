"""Tencent's UserSig (TLS sig v2, VENDORS.md §3): an HMAC-SHA256 of the admin identity with
the app's secret key, packed as zlib-compressed JSON in URL-safe base64. The client makes
one, the emulator checks it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import zlib
from typing import Any

from connector.vendors.tencent_im.settings import SIG_TTL

def signature(secret_key: str, identifier: str, sdkappid: Any, t: int, expire: int) -> str:
    """The ``TLS.sig`` of a UserSig: what makes it the app's."""
    content = f"TLS.identifier:{identifier}\nTLS.sdkappid:{sdkappid}\nTLS.time:{t}\nTLS.expire:{expire}\n"
    return base64.b64encode(hmac.new(secret_key.encode(), content.encode(), hashlib.sha256).digest()).decode()


def make_usersig(sdkappid: Any, secret_key: str, identifier: str, expire: int = SIG_TTL,
                 now: int | None = None) -> str:
    """A UserSig for ``identifier``, valid ``expire`` seconds from ``now``."""
    t = int(time.time()) if now is None else int(now)
    appid = int(sdkappid) if str(sdkappid).isdigit() else sdkappid
    doc = {"TLS.ver": "2.0", "TLS.identifier": str(identifier), "TLS.sdkappid": appid, "TLS.expire": int(expire),
           "TLS.time": t, "TLS.sig": signature(secret_key, identifier, appid, t, expire)}
    packed = base64.b64encode(zlib.compress(json.dumps(doc, separators=(",", ":")).encode())).decode()
    return packed.translate(str.maketrans("+/=", "*-_"))


def read_usersig(sig: str) -> dict[str, Any]:
    """The JSON inside a UserSig (raises ValueError when it is not one)."""
    try:
        raw = zlib.decompress(base64.b64decode(sig.translate(str.maketrans("*-_", "+/=")), validate=True))
        doc = json.loads(raw)
    except (ValueError, zlib.error) as e:
        raise ValueError(f"not a UserSig: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a UserSig")
    return doc
