# Two commands for a fresh machine (Linux or macOS, Python 3.10+):
#   make demo   the whole pipeline on the embedded demo data, ending in out/demo/report.md
#   make test   the test suite (pytest, CPU); make test-fast: its unit-level tier, for development
# Each creates .venv and installs requirements.txt on first use; later runs install nothing
# (the stamp .venv/.installed is newer than requirements.txt). make test also installs requirements-test.txt
# (stamp .venv/.installed-test), which builds llama.cpp once (llama-cpp-python; pip caches the wheel).
# torch: without an NVIDIA GPU (no nvidia-smi), the CPU build of torch==2.13.0 from the PyTorch CPU index
# (PyPI's Linux build carries CUDA libraries a CPU machine does not need), one try only, then torch's
# dependencies from PyPI (where that index cannot be reached, this second step takes torch from PyPI).
# With a GPU, a torch already in .venv is left as it is (install your CUDA build there first to pick it);
# otherwise torch==2.13.0 from PyPI, which is a CUDA build on Linux.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# llama-cpp-python builds llama.cpp: the library only, for any x86-64/arm64 CPU (the wheel is cached and reused)
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-fast bench-gpu

demo: $(STAMP)
	$(PY) demo.py

# the test files shared by TEST_WORKERS pytest processes (pytest-xdist), a whole file to one worker: a file's module
# fixtures (trained models, servers) are built once; each worker runs torch on one thread (conftest.py). Files go out
# in name order (xdist's default sends those with the most tests first, which leaves the long demo file for last)
TEST_WORKERS ?= 2

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the unit-level tier, for the inner loop while developing: every test not marked slow (no subprocess, torchrun,
# server, browser, llama.cpp or lm-eval run, nothing over a few seconds); make test runs them all
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

# make bench-gpu: every GPU figure of docs/BENCHMARKS.md, the most wanted first (124M with compile against HF,
# on real prepared data so the data-loading share is measured too), each run capped at BENCH_TIMEOUT seconds so
# that one slow compile does not cost the rest; a JSON and a log per run in BENCH_OUT. With PY given (a python
# that already has CUDA torch and transformers) nothing is installed:
#   make bench-gpu PY=python3 BENCH_OUT=/tmp/bench
BENCH_OUT ?= out/bench
BENCH_TIMEOUT ?= 300
bench_run = PYTHONUNBUFFERED=1 timeout $(BENCH_TIMEOUT) $(PY) bench.py $(2) --device=cuda --json=$(BENCH_OUT)/$(1).json \
	>$(BENCH_OUT)/$(1).log 2>&1; echo "== $(1): exit $$? ($(2))"; grep -v -i warn $(BENCH_OUT)/$(1).log | tail -n 14

bench-gpu: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	@mkdir -p $(BENCH_OUT)
	-nvidia-smi -q | grep -i -E "product name|driver version|clocks" >$(BENCH_OUT)/gpu.txt
	@test -f data/demo_pretrain/meta.json || $(PY) prepare.py config/prepare_demo.py >$(BENCH_OUT)/prepare.log 2>&1
	-@$(call bench_run,124m_compile,config/bench_124m.py --compare_hf=True --data_dir=data/demo_pretrain)
	-@$(call bench_run,26m_compile,config/bench_26m.py --compare_hf=True --prepare_mb=0)
	-@$(call bench_run,26m_cudagraphs,config/bench_26m.py --compare_hf=True --compile_mode=reduce-overhead --prepare_mb=0)
	-@$(call bench_run,124m_eager,config/bench_124m.py --compare_hf=True --compile=False --prepare_mb=0)
	-@$(call bench_run,26m_eager,config/bench_26m.py --compare_hf=True --compile=False --prepare_mb=0)
	-@$(call bench_run,26m_sft_packed,config/bench_26m.py --sft=True --batch_size=16)
	-@$(call bench_run,124m_sft_packed,config/bench_124m.py --sft=True --block_size=512 --batch_size=16 --gradient_accumulation_steps=1)
	-@$(call bench_run,26m_dpo_packed,config/bench_26m.py --dpo=True --batch_size=8)
	-@$(call bench_run,124m_lora,config/bench_124m.py --lora=True --block_size=512 --batch_size=8 --gradient_accumulation_steps=1)
	-@$(call bench_run,500m_lora,--lora=True --model=500m --block_size=512 --batch_size=8 --compile=True)
	-@$(call bench_run,26m_autotune,config/bench_26m.py --compare_hf=True --compile_mode=max-autotune-no-cudagraphs --prepare_mb=0)

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

$(TEST_STAMP): $(STAMP) requirements-test.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL="$$(nproc 2>/dev/null || echo 2)" \
		$(PY) -m pip install -r requirements-test.txt
	touch $(TEST_STAMP)
