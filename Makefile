# `make test` and `make demo` work from a clean clone on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are pinned to the pair that installs offline here and imports together
# (see ../shared/ENVIRONMENT.md); open_clip must be installed in the same command or it pulls
# another torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test lint demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS) -e ".[train,export,dev]"
	$(PIP) install -q -e ".[tensorrt-rtx]" || echo "note: TensorRT for RTX did not install; its build test will be skipped"
	touch $@

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
