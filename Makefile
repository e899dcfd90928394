# Two commands set up a fresh machine:  `make quickstart` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TINYSTORIES_DATA ?=
QUICKSTART_MINUTES ?= 10

STORIES260K ?= ../shared/models/llama2c-stories260K
CHECKPOINT ?=
PORT ?= 8000

.PHONY: venv quickstart test serve clean

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

# the playground on CHECKPOINT, else the quickstart's model, else llama2.c's stories260K imported from ../shared
serve: venv
	@ck="$(CHECKPOINT)"; \
	if [ -z "$$ck" ] && [ -e runs/quickstart/checkpoints/latest ]; then ck=runs/quickstart; fi; \
	if [ -z "$$ck" ]; then ck=runs/stories260K; [ -e $$ck/model.safetensors ] || \
	  $(VENV)/bin/tinystories import llama2c $(STORIES260K)/stories260K.bin --tokenizer $(STORIES260K)/tok512.model --out $$ck; fi; \
	$(VENV)/bin/tinystories serve --checkpoint $$ck --port $(PORT)

clean:
	rm -rf $(VENV) runs data/cache
