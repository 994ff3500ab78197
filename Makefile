# Two commands for a fresh machine (Linux or macOS, Python 3.10+):
#   make demo   the whole pipeline on the embedded demo data, ending in out/demo/report.md
#   make test   the test suite (pytest, CPU)
# Each creates .venv and installs requirements.txt on first use; later runs install nothing
# (the stamp .venv/.installed is newer than requirements.txt).
# torch: without an NVIDIA GPU (no nvidia-smi), the CPU build of torch==2.13.0 from the PyTorch CPU index
# (PyPI's Linux build carries CUDA libraries a CPU machine does not need), one try only, then torch's
# dependencies from PyPI (where that index cannot be reached, this second step takes torch from PyPI).
# With a GPU, a torch already in .venv is left as it is (install your CUDA build there first to pick it);
# otherwise torch==2.13.0 from PyPI, which is a CUDA build on Linux.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test

demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest -q

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "error: Python 3.10 or newer is needed (this is " + sys.version.split()[0] + "); run: make PYTHON=python3.12 ...")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		if $(PY) -c 'import torch' 2>/dev/null; then \
			echo "NVIDIA GPU: keeping the torch already in $(VENV) ($$($(PY) -c 'import torch; print(torch.__version__)'))"; \
		else \
			echo "NVIDIA GPU: installing $(TORCH) (CUDA build) from PyPI"; \
			$(PY) -m pip install $(TORCH); \
		fi; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of $(TORCH)"; \
		$(PY) -m pip install --retries 1 --no-deps $(TORCH) --index-url $(TORCH_CPU_INDEX); \
		$(PY) -m pip install $(TORCH); \
	fi
	grep -v '^torch' requirements.txt > $(VENV)/requirements-without-torch.txt
	$(PY) -m pip install -r $(VENV)/requirements-without-torch.txt
	touch $(STAMP)
