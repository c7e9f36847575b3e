# Each target does its own set-up, so one command works on a fresh machine.
PYTHON ?= python3

.PHONY: setup test example bench bench-results

# torch: the one already installed, else the 2.13.0 CPU build (a looser spec
# would pull a multi-GB CUDA build). The operator is compiled against it.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install "setuptools>=77" ninja pytest hypothesis numpy pytorch-revgrad torch-gradient-reversal onnx onnxscript onnxruntime
	$(PYTHON) -m pip install --no-build-isolation -e .

test: setup
	$(PYTHON) -m pytest

example: setup
	$(PYTHON) examples/independent_layers.py

# The benchmark: CPU, and CUDA where torch sees a GPU, into benchmarks/results/local/
# (ignored by git). BENCH_ARGS=--quick for a short run; see
# `python benchmarks/bench_bridge.py --help`.
bench: setup
	$(PYTHON) -m pip install matplotlib
	$(PYTHON) benchmarks/bench_bridge.py $(BENCH_ARGS)

# A full run into the committed benchmarks/results/<device>/, then the README's tables
# from them: the one target that rewrites tracked files; commit them together.
bench-results: setup
	$(PYTHON) -m pip install matplotlib
	$(PYTHON) benchmarks/bench_bridge.py --commit-results $(BENCH_ARGS)
	$(PYTHON) benchmarks/update_readme.py
