# usersync — every target makes its own virtualenv in .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench emulators airflow airflow-celery ddl clean help

help:
	@echo "make demo       build a demo warehouse, sync it to the vendor emulators, twice"
	@echo "make test       run the whole test suite (SQLite; PostgreSQL/MariaDB when their URLs are set;"
	@echo "                Airflow on Celery when Redis answers on 127.0.0.1:6379 and PostgreSQL is set)"
	@echo "make bench      run the benchmarks, write bench/results.md and bench/results.json"
	@echo "make emulators  serve the vendor emulators for demo/syncs.yaml in the foreground"
	@echo "make airflow-celery  Airflow on the CeleryExecutor (Redis, PostgreSQL, 2 workers) with the demo syncs"
	@echo "make ddl        regenerate sql/sync_tables.*.sql from the table definitions"
	@echo "make screenshots  rewrite docs/ui-*.png from the browser tests of Airflow's Syncs page"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/usersync demo --dir demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

emulators: $(STAMP)
	$(BIN)/usersync emulators --config demo/syncs.yaml

airflow: $(STAMP)
	$(BIN)/python -m connector.airflow.standalone --dir demo

# Airflow on the CeleryExecutor: Redis broker, PostgreSQL metadata database, two workers (the
# celery extra comes with the test extra)
airflow-celery: $(STAMP)
	$(BIN)/python -m connector.airflow.celery_deploy --dir demo

ddl: $(STAMP)
	for d in sqlite postgresql mysql; do $(BIN)/usersync ddl $$d > sql/sync_tables.$$d.sql; done

.PHONY: screenshots
screenshots: $(STAMP)
	USERSYNC_UI_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_ui.py

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache
