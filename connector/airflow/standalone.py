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
import signal
import subprocess
import sys
import time
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
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
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
          f"  Syncs (what each run did): {url}/usersync/  (also under 'Syncs' in Airflow's menu)\n"
          f"  DAGs: usersync__<sync> from {cfg}; emulators for the demo vendors are running.\n", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    standalone = subprocess.Popen([airflow, "standalone"], env=env, start_new_session=True)
    try:
        return standalone.wait()
    except KeyboardInterrupt:
        return 0
    finally:  # standalone's own children (scheduler, api-server, ...) share its process group
        _stop(standalone, group=True)
        _stop(emulators)
        print(f"\n  stopped. Airflow home: {home}; login: admin / {login}")

def _stop(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM (to the whole group of a process we started in its own session), SIGKILL after 30 s."""
    def send(sig):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
    if group:  # children may outlive the leader by a moment
        for _ in range(30):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(1)
        send(signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
