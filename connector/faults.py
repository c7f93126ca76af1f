"""Named crash points, so crash tests can SIGKILL a run at an exact step.

``USERSYNC_CRASH_AT=<point>[:<nth>]`` kills this process (SIGKILL: no cleanup, no
``finally``) the nth time (default: the first) it reaches ``crashpoint("<point>")``.
Unset, a crash point costs one dictionary lookup.

Points: ``extract_chunk`` (a chunk planned), ``plan_staged`` (the whole plan staged),
``intent`` (non-idempotent rows marked ``sending``, nothing sent yet), ``before_send``
(in a worker, just before the HTTP request), ``vendor_answered`` (answers in hand, not
yet recorded), ``after_commit`` (answers recorded), ``before_finalize``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

_seen: Counter[str] = Counter()
_lock = threading.Lock()


def crashpoint(name: str) -> None:
    spec = os.environ.get("USERSYNC_CRASH_AT")
    if not spec or spec.partition(":")[0] != name:
        return
    with _lock:
        _seen[name] += 1
        if _seen[name] == int(spec.partition(":")[2] or 1):
            os.kill(os.getpid(), signal.SIGKILL)
