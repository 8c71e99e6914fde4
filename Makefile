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

test: setup
	$(PY) -m ruff check --quiet .
	SEGDISTILL_CAMVID_ROOT="$(SEGDISTILL_CAMVID_ROOT)" $(PY) -m pytest -q tests
