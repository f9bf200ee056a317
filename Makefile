# stepdistill: make install | make demo | make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 first: a local CPU wheel on our machines; the project's own requirement is a
# range, so a GPU user's CUDA torch is kept.
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/stepdistill demo output_dir=runs/demo

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check stepdistill tests scripts

clean:
	rm -rf $(VENV) runs build *.egg-info
