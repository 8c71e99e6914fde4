# Two commands do everything on a fresh machine with Python 3.11 (see README.md):
#   make demo   set up .venv, then the demo on CPU: a small model with and without distillation (tools/demo.py)
#   make test   set up .venv, then the lint step (ruff, pyflakes rules: pyproject.toml) and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup:
	@tools/setup_env.sh $(VENV)

demo: setup
	$(PY) tools/demo.py

# The CamVid tests use $SEGDISTILL_CAMVID_ROOT; unset, the project machines' shared copy when it is
# there (../shared/data/camvid), else nothing: they skip (e.g. on CI). Never copied into the repo.
SEGDISTILL_CAMVID_ROOT ?= $(abspath $(wildcard ../shared/data/camvid))

# The suite runs in TEST_WORKERS processes (pytest-xdist): by default one per core, at most 8. Each
# test process is single-threaded (tests/conftest.py), so one per core fills the machine without
# oversubscribing it; past 8, each worker's own torch + detectron2 import (and memory) costs more
# than it brings, since the longest test files set the time. --dist loadfile keeps a file's tests in
# one worker: their module-scoped fixtures (a demo run, trained models, exported files) are built
# once. `make test TEST_WORKERS=0` runs it in one process, as `pytest tests` does.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 8 ? n : 8 )))

test: setup
	$(PY) -m ruff check --quiet .
	SEGDISTILL_CAMVID_ROOT="$(SEGDISTILL_CAMVID_ROOT)" $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
