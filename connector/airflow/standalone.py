"""``make airflow``: Airflow standalone on 127.0.0.1 with the demo syncs loaded and the emulators running.

Builds the demo (``demo/``) when missing, keeps Airflow's home in ``demo/airflow`` (SQLite),
creates the push pools, starts ``usersync emulators`` in the background and ``airflow
standalone`` in the foreground; Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="demo", help="demo directory (built when missing)")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    demo = Path(args.dir).resolve()
    cfg = demo / "syncs.yaml"
    if not cfg.exists():
        subprocess.run([str(BIN / "usersync"), "demo", "--dir", str(demo)], check=True)
    home = demo / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "USERSYNC_CONFIG": str(cfg),
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(args.port), "AIRFLOW__API__BASE_URL": url,
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin"}
    passwords = home / "simple_auth_manager_passwords.json.generated"
    if not passwords.exists():  # a known login to print (Airflow keeps users already in the file)
        passwords.write_text(json.dumps({"admin": secrets.token_urlsafe(9)}))
    login = json.loads(passwords.read_text())["admin"]

    airflow = str(BIN / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    from connector import config
    from connector.airflow.dags import pool_name
    from connector.airflow.tasks import pool_slots

    for spec in config.load(cfg, strict=False)[0].syncs:
        subprocess.run([airflow, "pools", "set", pool_name(spec), str(pool_slots()),
                        f"usersync pushes with the {spec.vendor.type} credential of {spec.name}"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    emulators = subprocess.Popen([str(BIN / "usersync"), "emulators", "--config", str(cfg)], env=env)
    print(f"\n  usersync on Airflow: {url}   login: admin / {login}\n"
          f"  DAGs: usersync__<sync> from {cfg}; emulators for the demo vendors are running.\n", flush=True)
    try:
        return subprocess.run([airflow, "standalone"], env=env).returncode
    except KeyboardInterrupt:
        return 0
    finally:
        emulators.terminate()
        emulators.wait(timeout=10)
        print(f"\n  stopped. Airflow home: {home}; login: admin / {login}")


if __name__ == "__main__":
    sys.exit(main())
