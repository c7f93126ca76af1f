"""What an import loads: parsing the DAG folder and ``usersync --help`` load neither pandas nor
numpy, and a production run (the engine and the vendor clients) never loads an emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from connector import demo_run

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pandas", "numpy")


def loaded(code: str, *names: str, env: dict[str, str] | None = None) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of ``names`` it left in ``sys.modules``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{n: n in sys.modules for n in {list(names)!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parsing_the_dag_folder_loads_neither_pandas_nor_numpy(tmp_path):
    cfg = demo_run.write_config(tmp_path)  # every vendor, both MoEngage modes' settings
    code = ("import runpy\n"
            "dags = runpy.run_path('dags/usersync_dags.py')\n"
            "assert any(k.startswith('usersync__') for k in dags), sorted(dags)")
    assert loaded(code, *HEAVY, "airflow", env={"USERSYNC_CONFIG": str(cfg)}) == {
        "pandas": False, "numpy": False, "airflow": True}


def test_usersync_help_loads_neither_pandas_nor_numpy():
    code = ("from connector import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code")
    assert loaded(code, *HEAVY) == {"pandas": False, "numpy": False}


def test_a_production_run_never_loads_an_emulator():
    code = ("from connector import engine, push, vendors\n"
            "clients = [vendors.get(name) for name in vendors.names()]")
    assert loaded(code, "http.server", "connector.vendors.emulator", "connector.engine") == {
        "http.server": False, "connector.vendors.emulator": False, "connector.engine": True}
