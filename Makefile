# Two commands do all the set-up (README "Quick start"):
#   make demo   # venv + torch + glassgpt, then prepare char Shakespeare -> train -> sample -> trace the sample
#   make test   # venv + torch + glassgpt, then the test suite
# Both create .venv/ in the checkout when it is missing (Python >= 3.10 on PATH as python3, or PYTHON=...),
# install torch 2.13.0 (the CPU build where there is no NVIDIA GPU, i.e. no nvidia-smi) and
# `pip install -e .[test,view]`. People who manage their own environment can still `pip install -e .`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# PyTorch's CPU-only wheels; used only where the registries pip already knows do not have the +cpu build
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
OUT ?= out-shakespeare-char

# Offline when the public data is beside the checkout (../shared/data) or GLASSGPT_MIRROR is set.
ifeq ($(GLASSGPT_MIRROR),)
ifneq ($(wildcard ../shared/data/tinyshakespeare/input.txt),)
export GLASSGPT_MIRROR := $(abspath ../shared/data)
endif
endif
export MPLBACKEND ?= Agg

# The main job's training recipe is the one for this machine: `python -m glassgpt.hardware` prints its config
# file (a CUDA GPU: config/train_shakespeare_char_gpu.py, bf16 + torch.compile + flash attention; Apple MPS:
# config/train_shakespeare_char_mps.py; a CPU: the CPU record recipe config/train_shakespeare_char_cpu.py)
# and, first in the log, which one and why. `make demo TRAIN_ARGS="..."` overrides it. The shell runs the
# command when the recipe line runs, after `env` has installed glassgpt.
TRAIN_ARGS ?= $$($(PY) -m glassgpt.hardware) --out_dir=$(OUT)

.PHONY: demo test lint lock env clean-env

# The stamp file is rewritten when pyproject.toml changes, so a new dependency is installed next time.
env: $(VENV)/.glassgpt-installed

$(VENV)/.glassgpt-installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "glassgpt needs Python >= 3.10, this is " + sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "$(TORCH_VERSION)")' 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed in $(VENV)"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	else \
		$(PY) -m pip install -q torch==$(TORCH_VERSION)+cpu 2>/dev/null \
		|| $(PY) -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[test,view]"
	@touch $@

demo: env
	$(PY) data/shakespeare_char/prepare.py
	$(PY) train.py $(TRAIN_ARGS)
	$(PY) sample.py --out_dir=$(OUT) --device=cpu --num_samples=1 --max_new_tokens=300 --stream=False \
		| sed '$$d' > $(OUT)/sample.txt
	@cat $(OUT)/sample.txt
	$(VENV)/bin/glassgpt trace-spans --out_dir=$(OUT) --build
	$(VENV)/bin/glassgpt trace-spans --out_dir=$(OUT) --text=FILE:$(OUT)/sample.txt
	$(VENV)/bin/glassgpt trace-influence --out_dir=$(OUT) --build --progress=False
	$(VENV)/bin/glassgpt trace-influence --out_dir=$(OUT) --text=FILE:$(OUT)/sample.txt
	$(VENV)/bin/glassgpt report --out_dir=$(OUT) --text=FILE:$(OUT)/sample.txt --build --out=$(OUT)/report.html

# pytest exits 5 when it collected no tests: make fails on any non-zero status, so that is a failure too.
# The venv's bin/ goes first on PATH: commands the tests start by name (glassgpt) are the venv's.
test: env lint
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

# The guard rails `make test` runs first: lint (ruff: pyflakes, pycodestyle incl. E304, bugbear, import
# order) and types (mypy), both configured in pyproject.toml.
lint: env
	$(VENV)/bin/ruff check glassgpt
	$(VENV)/bin/mypy

# constraints.txt pins every package the test environment installs except torch (pinned by TORCH_VERSION,
# whose build depends on the machine). Refresh it after changing dependencies: a fresh venv, unpinned
# install, freeze. Commit the result once `make test` passes with it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q torch==$(TORCH_VERSION)+cpu 2>/dev/null \
		|| .venv-lock/bin/python -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX)
	.venv-lock/bin/python -m pip install -q -e ".[test,view]"
	( echo "# pip constraints for the test environment (make installs with -c constraints.txt); refresh: make lock"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton)' ) > constraints.txt
	rm -rf .venv-lock

clean-env:
	rm -rf $(VENV)
