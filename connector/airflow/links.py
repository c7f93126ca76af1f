"""Where the "Syncs" pages live (``connector.airflow.plugin`` mounts them): no imports, so a
task can name a page in its log without loading the web app."""

from __future__ import annotations

import os

URL_PREFIX = "/usersync"


def run_url(sync: str, run_id: int) -> str:
    """The page of one run; absolute when Airflow's ``[api] base_url`` is set."""
    base = os.environ.get("AIRFLOW__API__BASE_URL", "")
    if not base:
        try:
            from airflow.configuration import conf

            base = conf.get("api", "base_url", fallback="") or ""
        except Exception:  # noqa: BLE001 - a log line never fails a task
            base = ""
    return f"{base.rstrip('/')}{URL_PREFIX}/syncs/{sync}/runs/{run_id}"
