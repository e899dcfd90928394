# Two commands set up a fresh machine:  `make quickstart` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TINYSTORIES_DATA ?=
QUICKSTART_MINUTES ?= 10

.PHONY: venv quickstart test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# keep an installed torch; otherwise install the pinned CPU-capable build instead of a multi-GB CUDA one
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test,serve,export,tensorboard]"
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(VENV)/bin/tinystories quickstart --minutes $(QUICKSTART_MINUTES) $(if $(TINYSTORIES_DATA),--data $(TINYSTORIES_DATA),)

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs data/cache
