# Two commands on a fresh machine: `make train` and `make test`. Each installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-all lock

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	scripts/install.sh $(VENV) test constraints.txt
	touch $(STAMP)

train: $(STAMP)  ## train the shakespeare config with the JAX trainer (CPU minutes), then print a sample
	$(PY) scripts/train_jax.py --config shakespeare

# pytest-xdist: a test file to a worker (its module fixtures, e.g. the README test's trained runs, are built once);
# two workers keep both cores of the 2-core CI machine busy while one of them waits on a subprocess
TEST_WORKERS ?= 2

test: $(STAMP)  ## the whole default test suite: unit tests and the JAX/PyTorch/transformers parity suite
	scripts/install_browser.sh
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)  ## also the tests marked slow
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m ""

lock:  ## upgrade on purpose: the newest versions pyproject.toml allows, into .venv-lock, recorded in constraints.txt
	rm -rf .venv-lock
	scripts/install.sh .venv-lock test none
	{ sed -n '1,3p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -v '^-e' \
	  | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@echo "constraints.txt updated; run make test (it reinstalls .venv from it) before committing it"
