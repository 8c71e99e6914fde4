# Two commands do everything on a fresh machine with Python 3.11 (see README.md):
#   make demo   set up .venv, then the demo on CPU: a small model with and without distillation (tools/demo.py)
#   make test   set up .venv, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup:
	@tools/setup_env.sh $(VENV)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests
