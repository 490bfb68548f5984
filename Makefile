# Two commands on a fresh machine: `make train` and `make test`. Each installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-all

$(STAMP): pyproject.toml scripts/install.sh
	scripts/install.sh $(VENV) test
	touch $(STAMP)

train: $(STAMP)  ## train the shakespeare config with the JAX trainer (CPU minutes), then print a sample
	$(PY) scripts/train_jax.py --config shakespeare

test: $(STAMP)  ## the whole default test suite: unit tests and the JAX/PyTorch/transformers parity suite
	scripts/install_browser.sh
	$(PY) -m pytest -q

test-all: $(STAMP)  ## also the tests marked slow
	$(PY) -m pytest -q -m ""
