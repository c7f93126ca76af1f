"""The DAG factory: one DAG per sync in syncs.yaml, ``usersync__<sync>``.

Parsing reads the YAML and nothing else (no database, no HTTP): the tasks re-read the
file in the worker and import the engine there. A sync whose config is broken still gets
its DAG, holding only a ``config_error`` task that fails with the error and a doc that
shows it, so one bad sync never takes the others down.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from connector import config, mapping
from connector.airflow import tasks
from connector.airflow.params import trigger_params

log = logging.getLogger("usersync.airflow")
PREFIX = "usersync__"
START = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
NO_SCHEDULE = {None, "", "none", "None", "null", "manual"}


def config_path(default: str | Path = "syncs.yaml") -> Path:
    return Path(os.environ.get("USERSYNC_CONFIG") or default).resolve()


def dag_id(sync: str) -> str:
    return PREFIX + sync


def pool_name(spec) -> str:
    """One pool per vendor credential: the connection, else a digest of the inline credentials."""
    v = spec.vendor
    if v.conn_id:
        return f"usersync_{v.type}__{v.conn_id}"
    text = repr((v.base_url, sorted(v.credentials.items()), sorted((k, str(x)) for k, x in v.settings.items())))
    return f"usersync_{v.type}__{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def timetable(schedule: str | None):
    """Cron schedules with data intervals, so a backfill run knows its window."""
    from airflow.sdk import CronDataIntervalTimetable

    if schedule in NO_SCHEDULE or schedule == "@once":
        return None if schedule != "@once" else "@once"
    return CronDataIntervalTimetable(schedule, timezone="UTC")


def doc_md(spec, path: Path) -> str:
    v = spec.vendor
    rows = "\n".join(f"| `{a.column}` | `{a.attribute}` | {a.type} | {a.rule} | {a.null} |" for a in spec.mapping)
    source = f"table `{spec.source.table}`" if spec.source.table else f"SQL file `{spec.source.sql}`"
    identity = ", ".join(f"`{col}` → {field}" for field, col in spec.identity_columns.items())
    creds = f"connection `{v.conn_id}` (type `usersync_{v.type}`)" if v.conn_id else "environment variables"
    g = spec.guard
    unset = f" (unset at the vendor: {', '.join(f'`{a}`' for a in spec.unset_removed)})" if spec.unset_removed else \
        " (the vendor keeps its values)"
    return f"""### usersync: `{spec.name}` → {v.type}

Reads {source}{f", cursor `{spec.cursor}`" if spec.cursor else " (no cursor: every run reads every row)"};
identity {identity}. Credentials from {creds}; pushes share the pool `{pool_name(spec)}`.

| column | vendor attribute | type | rule | NULL |
|---|---|---|---|---|
{rows}

Mapping `{mapping.digest(spec)}`. When it differs from the mapping last delivered, the next run is a mapping
backfill: it reads every user once and sends only the added or changed attributes, to the users whose wire
value changes; a removed attribute is no longer synced{unset}. When the delivered mapping last changed, and
in which run, is logged by the `plan` task and kept in `sync_mappings` and `sync_runs.mapping_change` (these
docs are built from the YAML alone, with no database at parse time).

**Tasks**: `plan` (extract, map, diff, stage in the state database; takes the sync's lock) →
`push` (one mapped task per shard of the staged plan, {spec.shards} shard(s)) → `finalize` (summary in
`sync_runs`; fails when rejected + failed users exceed {spec.max_failure_fraction:.0%}, releases the lock).

**Trigger form**: mode (incremental / full resync), a backfill window on the cursor, a list of user ids,
dry run, and the blast-radius guard override (the guard refuses changing more than
{g.max_changed_fraction:.0%} or nulling more than {g.max_nulled_fraction:.0%} of known users, once there
are {g.min_users}+). A backfill (`airflow backfill create`) uses each run's data interval as the window.
Runs of this sync never overlap: a run that finds the sync locked waits for it.

Config: `{path}`
"""


def _sync_dag(spec, path: Path):
    from airflow.sdk import DAG, task

    name = spec.name
    with DAG(
        dag_id=dag_id(name), schedule=timetable(spec.schedule), start_date=START, catchup=False,
        max_active_runs=1, tags=sorted({"usersync", spec.vendor.type, *spec.tags}),
        description=f"{name}: {spec.source.table or spec.source.sql} → {spec.vendor.type}",
        doc_md=doc_md(spec, path), params=trigger_params(), default_args={"owner": "usersync"},
    ) as dag:

        @task(task_id="plan", retries=tasks.lock_retries(),
              retry_delay=dt.timedelta(seconds=tasks.lock_retry_delay()))
        def plan(**context: Any) -> dict[str, Any]:
            dr = context["dag_run"]
            return tasks.plan(str(path), name, dict(context["params"]), dr.run_id,
                              getattr(dr.run_type, "value", str(dr.run_type)),
                              (context.get("data_interval_start"), context.get("data_interval_end")))

        @task(task_id="shards")
        def shards(planned: dict[str, Any]) -> list[dict[str, int]]:
            return planned["shards"]

        # retried: a push whose worker died is taken up by another worker (see tasks.push_retries)
        @task(task_id="push", pool=pool_name(spec), map_index_template="shard {{ job.shard }}",
              retries=tasks.push_retries(), retry_delay=dt.timedelta(seconds=tasks.push_retry_delay()))
        def push(job: dict[str, int], **context: Any) -> dict[str, Any]:
            return tasks.push(str(path), name, job, tasks.sender(context["ti"]))

        @task(task_id="finalize", trigger_rule="all_done")
        def finalize(**context: Any) -> dict[str, Any]:
            return tasks.finalize(str(path), name, context["ti"].xcom_pull(task_ids="plan"))

        planned = plan()
        pushed = push.expand(job=shards(planned))
        done = finalize()
        planned >> done
        pushed >> done
    return dag


def _broken_dag(label: str, error: Exception, path: Path):
    """The DAG of a sync whose config is broken: it shows the error and never runs green."""
    from airflow.sdk import DAG, task

    message = str(error)
    with DAG(
        dag_id=dag_id(re.sub(r"[^A-Za-z0-9_.-]", "_", label.replace("#", "sync_"))), schedule=None,
        start_date=START, catchup=False, tags=["usersync", "config-error"],
        description=f"CONFIG ERROR: {message}"[:200],
        doc_md=f"### usersync: configuration error\n\n```\n{message}\n```\n\nFix `{path}`; the DAG updates "
               "on the next parse.",
    ) as dag:

        @task(task_id="config_error", retries=0)
        def config_error() -> None:
            raise tasks.fail(message)

        config_error()
    return dag


def build(path: str | Path | None = None) -> dict[str, Any]:
    """{dag_id: DAG} for every sync in the file; a bad sync yields its error DAG."""
    path = config_path(path or "syncs.yaml")
    cfg, bad = config.load(path, strict=False)
    dags = {}
    for spec in cfg.syncs:
        dags[dag_id(spec.name)] = _sync_dag(spec, path)
    for label, error in bad.items():
        log.error("usersync: %s", error)
        dag = _broken_dag(label, error, path)
        if dag.dag_id in dags:  # e.g. a duplicate name: the first definition keeps its DAG
            continue
        dags[dag.dag_id] = dag
    return dags
