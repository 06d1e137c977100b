# Two commands on a fresh machine:  make demo   (the main job)   and   make test   (the test suite).
# Both create/update the pinned environment in .venv first (idempotent; a few minutes the first time).
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/requirements/constraints.txt

.PHONY: install demo test test-fast test-upstream bench lock clean help

help:
	@echo "make demo            - the main job: edit facts in the embedded model through EasyEdit's BaseEditor"
	@echo "make test            - the full test suite (what CI runs)"
	@echo "make test-upstream EASYEDIT_SRC=<checkout> - integration tests against a current EasyEdit source checkout"
	@echo "make bench           - the benchmark harness (full mode; slow on CPU)"
	@echo "make lock            - re-freeze requirements/constraints.txt from the current .venv"

install: $(VENV)/.easyedit-agrade-stamp

$(VENV)/.easyedit-agrade-stamp: requirements/base.in requirements/extra-no-deps.txt requirements/constraints.txt setup.cfg scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh

demo: install
	$(PY) -m easyedit_agrade demo --fast-metrics

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

test-upstream:
	@test -n "$(EASYEDIT_SRC)" || (echo "usage: make test-upstream EASYEDIT_SRC=/path/to/EasyEdit-checkout"; exit 2)
	EASYEDIT_SRC=$(EASYEDIT_SRC) bash scripts/test_upstream.sh

bench: install
	$(PY) -m easyedit_agrade bench

lock:
	(echo "# Exact versions of every package in the project environment (Python 3.11, x86_64)."; \
	 echo "# Applied with -c to every pip call (scripts/bootstrap.sh). Regenerate: make lock"; \
	 $(PY) -m pip freeze --exclude-editable | grep -v '^-e') > requirements/constraints.txt

clean:
	rm -rf build dist *.egg-info .pytest_cache
