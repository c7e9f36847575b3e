# Each target does its own set-up, so one command works on a fresh machine; a
# stamp per torch version skips the set-up until the sources or torch change.
PYTHON ?= python3
TORCH_VERSION := $(shell $(PYTHON) -c "import torch; print(torch.__version__)" 2>/dev/null)
# What a machine without torch gets: .ci/torch-versions, the one place CI's torch releases are written.
DEFAULT_TORCH := $(shell awk '$$1 == "default" {print $$2}' .ci/torch-versions)
STAMP = .make/installed-torch-$(TORCH_VERSION)
INSTALL_TORCH = $(PYTHON) -c "import torch" 2>/dev/null || { \
	  echo "make: no torch is importable; installing torch==$(DEFAULT_TORCH) with pip (which build depends on your pip's index)"; \
	  $(PYTHON) -m pip install torch==$(DEFAULT_TORCH); }
# pytest-xdist workers: two, a 2-core machine's (CI's); WORKERS=0 runs in one process.
WORKERS ?= 2
PYTEST = $(PYTHON) -m pytest -p no:cacheprovider -n $(WORKERS)

.PHONY: setup test test-all example example-results bench bench-results

setup: $(STAMP)

# torch: the one already installed (install yours first: CPU or CUDA, as you
# want it). Only where none is importable does this install the default torch,
# and which build pip picks depends on its index (PyPI's, on Linux x86_64, is the
# CUDA build with its nvidia packages). The operator is compiled against it; the
# test packages are pyproject.toml's `test` extra.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	@$(INSTALL_TORCH) && $(PYTHON) -c "import torch; print('make: torch', torch.__version__, 'with CUDA ' + torch.version.cuda if torch.version.cuda else '(CPU only)')"
	$(PYTHON) -m pip install "setuptools>=77" ninja
	$(PYTHON) -m pip install --no-build-isolation -e ".[test]"
	@rm -rf .make && mkdir -p .make && touch .make/installed-torch-$$($(PYTHON) -c "import torch; print(torch.__version__)")

# The native operator or a failure: a broken build must never pass on the
# pure-Python fallback (its target-specific value reaches setup's build too).
# `make test`: every public behaviour once, in minutes (the markers `slow` and
# `network` mark the rest); `make test-all`: everything, what CI runs.
test test-all: export GRADBRIDGE_EXT_REQUIRE_NATIVE = 1
test: setup
	$(PYTEST) -m "not slow and not network" $(PYTEST_ARGS)

test-all: setup
	$(PYTEST) $(PYTEST_ARGS)

# Lean on purpose: not `setup` (the test packages, some 500 MB, and an editable
# install that would replace yours). An importable gradbridge_ext is used as it
# is; only where none is does this install the package as the README does. The
# check drops the current folder from sys.path, so that the checkout's own
# gradbridge_ext/ cannot stand in for an install. numpy: the example seeds it,
# and torch warns on every import without it. One Python start checks it all
# (each start imports torch, so one start rather than three).
example:
	@$(PYTHON) -c "import sys; sys.path[:] = [p for p in sys.path if p]; import numpy, gradbridge_ext" 2>/dev/null || { \
	  { $(INSTALL_TORCH); } && \
	  { $(PYTHON) -c "import sys; sys.path[:] = [p for p in sys.path if p]; import gradbridge_ext" 2>/dev/null || { \
	    echo "make: gradbridge_ext is not importable; installing it (pip install --no-build-isolation .)"; \
	    $(PYTHON) -m pip install "setuptools>=77" ninja && $(PYTHON) -m pip install --no-build-isolation .; }; } && \
	  { $(PYTHON) -c "import numpy" 2>/dev/null || $(PYTHON) -m pip install numpy; }; }
	$(PYTHON) examples/independent_layers.py

# Every example, its output committed to examples/results/<name>.txt with the machine,
# torch and commit (the README's figures are these files'); commit them together.
example-results: example
	$(PYTHON) -m pip install -q -r examples/requirements.txt
	$(PYTHON) examples/record.py

# The benchmark: CPU, and CUDA where torch sees a GPU, into benchmarks/results/local/
# (ignored by git). BENCH_ARGS=--quick for a short run; see
# `python benchmarks/bench_bridge.py --help`.
bench: setup
	$(PYTHON) -m pip install matplotlib
	$(PYTHON) benchmarks/bench_bridge.py $(BENCH_ARGS)

# A full run into the committed benchmarks/results/<device>/, then the generated
# regions of the README and docs/ from them (benchmarks/update_readme.py): it rewrites
# tracked files, as example-results does; commit them together.
bench-results: setup
	$(PYTHON) -m pip install matplotlib
	$(PYTHON) benchmarks/bench_bridge.py --commit-results $(BENCH_ARGS)
	$(PYTHON) benchmarks/update_readme.py
