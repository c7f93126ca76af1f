"""usersync DAGs for Airflow 3: one DAG per sync in the file named by USERSYNC_CONFIG
(default: syncs.yaml at the project root). Parsing reads that YAML and nothing else."""

from pathlib import Path

from connector.airflow.dags import build

globals().update(build(Path(__file__).resolve().parents[1] / "syncs.yaml"))
