# Two commands do everything: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (the package itself asks for torch>=2.11): an unpinned torch pulls a
# multi-GB build; torchvision must match it.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
RUFF_PIN := ruff==0.16.9
# `make test-compat`: the oldest torch the package supports (the GPU machine's), in its own venv.
COMPAT_VENV ?= .venv-compat
# numpy<2.4: Triton 3.6's interpreter (TRITON_INTERPRET=1, how the tests run the kernels on CPU)
# calls int() on 1-element arrays, a TypeError since NumPy 2.4 (fixed in later Triton).
COMPAT_PINS := torch==2.11.0 torchvision==0.26.0 "numpy<2.4"

.PHONY: setup demo test bench lint test-compat check-install

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) ninja "setuptools>=64" wheel $(RUFF_PIN)
	# --no-build-isolation: compile against the torch that will load the extension
	$(PY) -m pip install -q --no-build-isolation -e ".[test,viz,demo]"
	touch $@

demo: setup
	$(VENV)/bin/rlrp-fast demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# The CPU test suite against the installed (not editable) package under torch 2.11: a plain
# `pip install` (build isolation, so no extension ahead of time: the cpp backend compiles itself
# on first use, into the venv's own folder), run from outside the checkout so that the package
# under test is the installed one. Downloads torch 2.11 (~3 GB with its CUDA libraries) once.
$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_PINS)
	$(COMPAT_VENV)/bin/python -m pip install -q ".[test]"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps --force-reinstall .  # this checkout, as is
	cd "$$(mktemp -d)" && TORCH_EXTENSIONS_DIR="$(CURDIR)/$(COMPAT_VENV)/torch_extensions" \
		"$(CURDIR)/$(COMPAT_VENV)/bin/python" -m pytest -q -c "$(CURDIR)/pyproject.toml" \
		--rootdir "$(CURDIR)" "$(CURDIR)/tests"

# `pip install .` into a fresh venv that already has torch must leave torch alone, and the cpp
# backend must work there after its first-use build. Not run by CI (a second torch install).
check-install:
	bash scripts/check_install.sh
