"""The trigger form: what an analyst may set when running a sync from the Airflow UI.

JSON-schema validated by Airflow before a run is created (enums, types, patterns); the
plan task checks what a schema cannot (window start before end, a cursor to window on).
"""

from __future__ import annotations

from typing import Any

# ISO-8601 date-time: the UI's picker sends this; "Z" or an offset optional (UTC when absent).
# A pattern as well as format="date-time": jsonschema checks that format only when an
# optional package is installed.
DATETIME = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?$"
USER_ID = r"^\S(.*\S)?$"


def trigger_params() -> dict[str, Any]:
    from airflow.sdk import Param

    return {
        "mode": Param(
            "incremental", type="string", enum=["incremental", "full"], title="Mode",
            description="incremental: read only rows whose cursor moved since the last successful run "
                        "(plus users that failed before) and send what changed. full: read every row and re-send "
                        "every set attribute (a resync, e.g. after the vendor lost data). Increments still send "
                        "only the difference from what was delivered, so nothing is counted twice.",
            values_display={"incremental": "Incremental (changes since last run)", "full": "Full resync"},
        ),
        "window_start": Param(
            None, type=["null", "string"], format="date-time", pattern=DATETIME, title="Backfill from",
            description="Optional. Only rows whose cursor column is at or after this time (UTC unless an "
                        "offset is given), e.g. 2026-01-01T00:00:00Z. A window run does not move the cursor.",
        ),
        "window_end": Param(
            None, type=["null", "string"], format="date-time", pattern=DATETIME, title="Backfill to",
            description="Optional. Only rows whose cursor column is before this time (exclusive).",
        ),
        "user_ids": Param(
            None, type=["null", "array"], items={"type": "string", "pattern": USER_ID, "minLength": 1},
            maxItems=10_000, title="Only these users",
            description="Optional list of user ids (values of the sync's identity column). Only these users "
                        "are read and compared; the cursor does not move.",
        ),
        "dry_run": Param(
            False, type="boolean", title="Dry run",
            description="Plan and count only: nothing is sent and no state changes except the run record.",
        ),
        "allow_large_change": Param(
            False, type="boolean", title="Override the blast-radius guard",
            description="The guard refuses a run that would change or null an implausibly large share of "
                        "known users (see the DAG's docs). Tick only after checking the plan is intended.",
        ),
    }
