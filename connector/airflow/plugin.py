"""The ``airflow.plugins`` entry point: the "Syncs" pages inside Airflow's UI.

``fastapi_apps`` mounts ``connector.airflow.ui`` at ``/usersync`` on the api-server.
``external_views`` put "Syncs" in Airflow's navigation and a tab on every DAG, DAG run and
task instance page; Airflow shows them in an iframe (same origin, so the UI's login cookie
goes along) and fills ``{DAG_ID}`` / ``{RUN_ID}`` in. The tab of a DAG that is not a
usersync DAG says so.

Every Airflow process loads plugins (scheduler, DAG processor, each task), and only the
api-server serves the app: it is built on its first request, so the others never import
FastAPI, Jinja or the query layer for it.
"""

from __future__ import annotations

import threading

from airflow.plugins_manager import AirflowPlugin

from connector.airflow.links import URL_PREFIX


class LazyApp:
    """An ASGI app that builds ``connector.airflow.ui.make_app()`` on its first request."""

    def __init__(self):
        self._app, self._lock = None, threading.Lock()

    async def __call__(self, scope, receive, send):
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from connector.airflow import ui

                    self._app = ui.make_app()
        await self._app(scope, receive, send)


class UsersyncPlugin(AirflowPlugin):
    name = "usersync"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "usersync syncs"}]
    external_views = [
        {"name": "Syncs", "href": f"{URL_PREFIX}/", "destination": "nav", "url_route": "usersync",
         "nav_top_level": True},
        {"name": "Sync", "href": f"{URL_PREFIX}/dags/{{DAG_ID}}", "destination": "dag", "url_route": "usersync-dag"},
        {"name": "Sync run", "href": f"{URL_PREFIX}/dags/{{DAG_ID}}/runs/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "usersync-dag-run"},
        {"name": "Sync run", "href": f"{URL_PREFIX}/dags/{{DAG_ID}}/runs/{{RUN_ID}}",
         "destination": "task_instance", "url_route": "usersync-task"},
    ]
