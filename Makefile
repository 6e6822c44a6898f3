# dtn-torchrec: the two commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
STAMP := $(VENV)/.setup-done

# The pinned CPU stack, installed in this order: torchrec's metadata pulls the CUDA fbgemm-gpu,
# which would overwrite the CPU build, so torchrec goes in with --no-deps after fbgemm-gpu-cpu,
# followed by torchrec's own runtime needs.
TORCH_PKGS := torch==2.13.0 fbgemm-gpu-cpu==1.8.0
TORCHREC_PKG := torchrec==1.8.0
TORCHREC_DEPS := tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath
PROJECT_DEPS := numpy pyarrow pyyaml torchx==0.7.0 tensorboard matplotlib psutil pytest pytest-timeout ruff==0.17.6

.PHONY: setup lint test test-fast demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PKGS)
	$(PIP) install -q --no-deps $(TORCHREC_PKG)
	$(PIP) install -q $(TORCHREC_DEPS) $(PROJECT_DEPS)
	$(PIP) install -q --no-deps -e .
	$(VPY) -c "import torch, torchrec, fbgemm_gpu, pyarrow, torchx; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

# Formatting and lint (ruff settings in pyproject.toml); part of every test run.
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# Full suite, slow multi-process tests included (what CI runs).
test: lint
	$(VPY) -m pytest -q tests

# Fast subset for development.
test-fast: lint
	$(VPY) -m pytest -q -m "not slow" tests

demo: setup
	bash launchers/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info
