"""``make airflow-celery``: Airflow 3.3 on the CeleryExecutor, every component a process of its own.

    python -m connector.airflow.celery_deploy --dir demo     # the demo syncs; Ctrl-C stops everything

What :class:`Deployment` starts (all on 127.0.0.1) and stops again:

- a PostgreSQL database of its own as Airflow's metadata database (created here; the demo's
  is kept between runs, a test's is dropped);
- ``airflow api-server``: the UI, the REST API, and the Task Execution API through which the
  workers run their tasks (``[core] execution_api_server_url``; its JWTs are signed with
  ``[api_auth] jwt_secret``, which every component must share);
- ``airflow scheduler``, whose CeleryExecutor queues each task instance in Redis;
- ``airflow dag-processor``, which parses ``dags/usersync_dags.py``;
- ``airflow celery worker`` N times, each with a name of its own, given both as its Celery
  hostname and as its Airflow hostname (``[core] hostname_callable``): two workers on one
  machine then look like the two machines they stand for, in Airflow's task instances and in
  ``sync_batches.worker``.

Redis is the broker, not RabbitMQ: one service with no vhost or user to set up (what Airflow's
own docker-compose uses), and every key of a deployment lives under a prefix of its own
(``global_keyprefix``), so deployments sharing the server never see each other's tasks and
:meth:`Deployment.stop` deletes what it left. The result backend is Airflow's default, the
metadata database. A worker that dies with a task is noticed by Airflow's own task heartbeat
(``[scheduler] task_instance_heartbeat_timeout``), not the broker: RabbitMQ would redeliver the
dead worker's message at once, but Airflow ignores a message for a task it thinks still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/0"
READY_TIMEOUT = 240.0  # seconds for a component to come up on a busy 2-core machine


def worker_hostname() -> str:
    """``[core] hostname_callable`` of a worker this module starts: its own name."""
    return os.environ["USERSYNC_WORKER_HOSTNAME"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """Airflow on Celery for the syncs in ``config``, its files under ``home``.

    ``env``: more environment for every component (the syncs' secrets, USERSYNC_* knobs);
    ``quick_failover``: notice a dead task in seconds rather than minutes (tests).
    ``concurrency``: task slots of each worker, by default a push pool's size: one worker alone
    can then run every push the pool lets through, so when another worker dies its pushes are
    retried at once, not after the survivor's own pushes have finished.
    """

    def __init__(self, home: Path, config: Path, *, port: int = 8080, workers: int = 2, concurrency: int | None = None,
                 database: str = "usersync_airflow", server: str = POSTGRES, broker: str = REDIS,
                 env: dict[str, str] | None = None, drop_database: bool = False, quick_failover: bool = False):
        self.home, self.config = Path(home).resolve(), Path(config).resolve()
        from connector.airflow.tasks import pool_slots

        self.port, self.concurrency, self.broker = port or free_port(), concurrency or pool_slots(), broker
        self.server, self.database, self.drop_database = server, database, drop_database
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"usersync-{database}:"  # every broker key of this deployment
        self.workers = {f"worker{i + 1}@{socket.gethostname()}": None for i in range(workers)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.login = self._password()
        self.metadata_url = sa.make_url(server).set(database=database).render_as_string(hide_password=False)
        self.env = {
            **os.environ, **(env or {}),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__CELERY__BROKER_URL": broker,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.prefix,
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",  # readiness is read from the components' INFO lines
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url, "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "USERSYNC_CONFIG": str(self.config),
        }
        if quick_failover:
            self.env.update({
                # a task whose supervisor stopped heartbeating is failed (and retried) after 20 s, not 5 min
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
            })
        self._token: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Deployment:
        try:
            self._create_database()
            self.airflow("db", "migrate")
            self._pools()
            self._spawn("api-server", "api-server")
            self._spawn("scheduler", "scheduler")
            self._spawn("dag-processor", "dag-processor")
            for name in self.workers:
                # its own log-server port: two workers on one machine cannot share 8793
                self._spawn(name, "celery", "worker", "--celery-hostname", name, "--concurrency",
                            str(self.concurrency), env={"AIRFLOW__CORE__HOSTNAME_CALLABLE":
                                                        f"{__name__}.worker_hostname",
                                                        "USERSYNC_WORKER_HOSTNAME": name,
                                                        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to every component's process group, SIGKILL to what is left after 20 s;
        then the broker keys, and the metadata database when it was made to be dropped."""
        import psutil

        descendants = []  # task processes run in sessions of their own: gone with their group or not
        for proc in self.procs.values():
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():  # the group: a worker's task processes may outlive it
            _signal(proc, signal.SIGKILL)
            proc.wait()
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.procs.clear()
        self._clear_broker()
        if self.drop_database:
            admin = sa.create_engine(self.server, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
            admin.dispose()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker with everything it runs, as if its machine died: every descendant, not
        only its process group (Airflow starts each task's processes in a session of their own,
        and a task left alive would go on pushing)."""
        import psutil

        proc = self.procs.pop(name)
        doomed = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    # -- Airflow ---------------------------------------------------------------------------
    def airflow(self, *args: str, timeout: float = 600) -> str:
        out = subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        return out.stdout

    def api(self, method: str, path: str, **kw: Any) -> Any:
        """The REST API (``/api/v2/...``), logged in as admin."""
        if self._token is None:
            r = requests.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.login}, timeout=30)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        r = requests.request(method, f"{self.url}/api/v2/{path}", headers={"Authorization": f"Bearer {self._token}"},
                             timeout=60, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:2000]}")
        return r.json() if r.content else None

    def metadata(self) -> sa.Engine:
        """Airflow's metadata database (task instances, their hostnames and tries)."""
        return sa.create_engine(self.metadata_url)

    def wait_dag(self, dag_id: str, timeout: float = READY_TIMEOUT) -> None:
        """Until the dag-processor has parsed ``dag_id`` into the metadata database."""
        _until(lambda: requests.get(f"{self.url}/api/v2/dags/{dag_id}", timeout=10, headers=self._auth())
               .status_code == 200, timeout, f"DAG {dag_id} parsed", self)

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900) -> str:
        """Until the DAG run finishes; its state."""
        done = {}

        def finished() -> bool:
            done["state"] = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")["state"]
            return done["state"] in ("success", "failed")

        _until(finished, timeout, f"run {run_id} finished", self)
        return done["state"]

    # -- internals -------------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        if self._token is None:
            self.api("GET", "version")
        return {"Authorization": f"Bearer {self._token}"}

    def _password(self) -> str:
        """A known login to print: Airflow's simple auth manager keeps users already in its file."""
        passwords = self.home / "simple_auth_manager_passwords.json.generated"
        if not passwords.exists():
            passwords.write_text(json.dumps({"admin": secrets.token_urlsafe(9)}))
        return json.loads(passwords.read_text())["admin"]

    def _create_database(self) -> None:
        admin = sa.create_engine(self.server, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            if not c.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": self.database}).scalar():
                c.execute(sa.text(f'CREATE DATABASE "{self.database}"'))
        admin.dispose()

    def _pools(self) -> None:
        """The push pools, one per vendor credential, from the syncs (a task in a missing pool never runs)."""
        from connector import config
        from connector.airflow.dags import pool_name
        from connector.airflow.tasks import pool_slots

        saved = dict(os.environ)
        os.environ.update(self.env)  # the syncs' credentials: an inline one names its pool by digest
        try:
            syncs, slots = config.load(self.config, strict=False)[0].syncs, pool_slots()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        pools = {pool_name(s): {"slots": slots, "description": f"usersync pushes with the {s.vendor.type} "
                                f"credential of {s.name}", "include_deferred": False} for s in syncs}
        path = self.home / "pools.json"
        path.write_text(json.dumps(pools))
        self.airflow("pools", "import", str(path))

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = open(self.home / "logs" / f"{name.split('@')[0]}.log", "ab")
        self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env={**self.env, **(env or {})},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_ready(self) -> None:
        def healthy() -> bool:
            try:
                h = requests.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
            except (requests.RequestException, ValueError):
                return False
            return all(h.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler", "dag_processor"))

        _until(healthy, READY_TIMEOUT, "api-server, scheduler and dag-processor healthy", self)
        for name in self.workers:  # each has joined the broker (Celery logs "<name> ready.")
            log = self.home / "logs" / f"{name.split('@')[0]}.log"
            _until(lambda: f"{name} ready." in log.read_text(errors="replace"), READY_TIMEOUT,
                   f"worker {name} ready", self)

    def _clear_broker(self) -> None:
        import redis

        client = redis.Redis.from_url(self.broker)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*"))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass
        finally:
            client.close()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _until(check, timeout: float, what: str, deployment: Deployment | None = None) -> None:
    """A bounded wait for readiness; a component that died meanwhile ends it at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if deployment:
            dead = [n for n, p in deployment.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"waiting for {what}: {', '.join(dead)} exited (logs in {deployment.home / 'logs'})")
        time.sleep(1)
    raise TimeoutError(f"waiting for {what}: not within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="demo", help="demo directory (built when missing)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    demo = Path(args.dir).resolve()
    cfg = demo / "syncs.yaml"
    if not cfg.exists():
        subprocess.run([str(BIN / "usersync"), "demo", "--dir", str(demo)], check=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    deployment = Deployment(demo / "airflow-celery", cfg, port=args.port, workers=args.workers)
    emulators = subprocess.Popen([str(BIN / "usersync"), "emulators", "--config", str(cfg)], env=deployment.env,
                                 start_new_session=True)
    try:
        print("  starting Airflow on Celery (metadata database, migrations, components) ...", flush=True)
        deployment.start()
        print(f"\n  usersync on Airflow (CeleryExecutor): {deployment.url}   login: admin / {deployment.login}\n"
              f"  components: api-server, scheduler, dag-processor, workers {', '.join(deployment.workers)}\n"
              f"  broker {deployment.broker} (keys {deployment.prefix}*), metadata database "
              f"{deployment.database}; logs in {deployment.home / 'logs'}\n"
              f"  DAGs: usersync__<sync> from {cfg}; emulators for the demo vendors are running.\n", flush=True)
        while all(p.poll() is None for p in deployment.procs.values()):
            time.sleep(1)
        print("  a component exited; stopping the others", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        deployment.stop()
        _signal(emulators, signal.SIGTERM)
        emulators.wait()
        print(f"\n  stopped. Airflow home: {deployment.home}; login: admin / {deployment.login}")


if __name__ == "__main__":
    sys.exit(main())
