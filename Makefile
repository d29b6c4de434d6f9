# Two commands do everything: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (the package itself asks for torch>=2.11): an unpinned torch pulls a
# multi-GB build; torchvision must match it.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) ninja "setuptools>=64" wheel
	# --no-build-isolation: compile against the torch that will load the extension
	$(PY) -m pip install -q --no-build-isolation -e ".[test,viz,demo]"
	touch $@

demo: setup
	$(VENV)/bin/rlrp-fast demo

test: setup
	$(PY) -m pytest -q
