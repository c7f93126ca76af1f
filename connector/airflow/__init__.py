"""Airflow 3 integration: the DAG factory, the task callables, the trigger form and the provider.

Nothing here is imported by the engine; Airflow (``apache-airflow>=3.3``) is only needed
where a module says so. ``dags/usersync_dags.py`` calls :func:`connector.airflow.dags.build`.
"""
