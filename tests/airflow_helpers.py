"""Airflow plumbing for tests/test_airflow.py: a throwaway AIRFLOW_HOME, and running the DAG
runs that `airflow backfill create` made (dag.test() only makes manual runs).

The run loop is dag.test()'s own (Airflow 3.3, sdk/definitions/dag.py), pointed at an
existing run instead of a new manual one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
BIN = Path(sys.executable).parent


def airflow_env(home: Path) -> dict[str, str]:
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "USERSYNC_LOCK_RETRY_DELAY": "1",
        "USERSYNC_LOCK_RETRIES": "20",
    }


def make_home() -> Path:
    """A temporary AIRFLOW_HOME with a migrated SQLite metadata database (about 4 s)."""
    home = Path(tempfile.mkdtemp(prefix="usersync-airflow-"))
    env = {**os.environ, **airflow_env(home)}
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=240)
    return home


def clone_home(home: Path) -> Path:
    """Another AIRFLOW_HOME with a copy of the migrated database (an independent Airflow)."""
    other = Path(tempfile.mkdtemp(prefix="usersync-airflow-"))
    shutil.copy(home / "airflow.db", other / "airflow.db")
    return other


def sync_dags_to_db() -> None:
    """Parse the DAG folder into the metadata DB, as the DAG processor (and dag.test) does."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.utils.session import create_session

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
        sync_bag_to_db(bag, bundle.name, bundle.version)


def run_existing(dag, run_id: str):
    """Run every task of an existing DAG run in this process until the run finishes."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.sdk import timezone
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select

    session = settings.Session()
    dr = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id))
    dr.dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    dr.state, dr.start_date = DagRunState.RUNNING, timezone.utcnow()
    session.commit()
    while dr.state == DagRunState.RUNNING:
        session.expire_all()
        schedulable, _ = dr.update_state(session=session)
        for ti in schedulable:
            ti.try_number += 1
            ti.state, ti.scheduled_dttm = TaskInstanceState.SCHEDULED, timezone.utcnow()
        session.commit()
        for ti in [t for t in dr.get_task_instances(session=session) if t.state == TaskInstanceState.SCHEDULED]:
            try:
                _run_task(ti=ti, task=dag.task_dict[ti.task_id])
            except Exception:  # recorded on the task instance, as in dag.test()
                pass
    return dr


if __name__ == "__main__":  # python airflow_helpers.py DAG_ID LOGICAL_DATE: one dag.test(), exit 0 on success
    import datetime as dt

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    dr = bag.dags[sys.argv[1]].test(logical_date=dt.datetime.fromisoformat(sys.argv[2]).replace(tzinfo=dt.timezone.utc))
    print("DAGRUN", dr.run_id, dr.state, flush=True)
    sys.exit(0 if dr.state == "success" else 1)
