# Countersign: `make run` starts the server and its worker; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/countersign
# A Redis database of its own, so tests never talk to a running dev server.
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: run test install migrate bench lint clean demo demo-mcp

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

migrate: install
	$(PY) manage.py migrate --noinput

run: install
	scripts/ensure_services.sh redis
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	scripts/run.sh

demo: install
	scripts/demo.sh

# The demo, plus the MCP server of examples/mcp (http://127.0.0.1:8110/mcp) for any MCP client.
demo-mcp: install
	DEMO_MCP=1 scripts/demo.sh

# mypy --strict with django-stubs over every package ([tool.mypy] files in pyproject.toml), and
# the layer rule of docs/architecture.md (tests/test_layers.py: reads imports, needs no services).
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layers.py

test: install
	scripts/ensure_services.sh redis postgres
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(PY) -m pytest

# Countersign's token endpoint beside stock DOT and the floor; BENCH_ARGS="--rounds 9" to change sizes.
bench: install
	scripts/ensure_services.sh redis postgres
	$(PY) bench/peers.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var db.sqlite3 .pytest_cache
