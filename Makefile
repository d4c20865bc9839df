# fedmoe: `make run` runs the default federated job, `make test` the test suite.
# Both first run `make setup`: a virtual environment in .venv with the pinned dependencies
# (torch first, from its CPU wheel), the Fashion-MNIST data and docker-compose where apt works.
# Every target is idempotent; setup is skipped when nothing it depends on changed.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fedmoe-setup
TORCH := torch==2.13.0
# Where torch comes from: PyTorch's CPU wheel index by default (the default index serves the CUDA
# build for Linux, gigabytes); `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126` for
# CUDA, `TORCH_INDEX=` for the default index. An unreachable index fails within seconds and set-up
# falls back to the default index (and whatever pip.conf adds).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP := $(VPY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup run test data clean mutation

setup: $(STAMP) data .flwr/config.toml

# `flwr run .` with this venv activated: FLWR_HOME in the checkout (3 simulated SuperNodes, see
# scripts/flwr-config.toml) and no per-run re-install of the dependencies by the SuperLink (it
# would fetch them with uv into a fresh environment for every run; the venv already has them).
ACTIVATE_HOOK := export FLWR_HOME="$(CURDIR)/.flwr" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  \# fedmoe: flwr run . in this checkout
.flwr/config.toml: scripts/flwr-config.toml $(STAMP)
	mkdir -p .flwr && cp scripts/flwr-config.toml $@
	sed -i '/# fedmoe: flwr run . in this checkout/d' $(VENV)/bin/activate
	echo '$(ACTIVATE_HOOK)' >> $(VENV)/bin/activate

$(STAMP): pyproject.toml constraints.txt Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fedmoe needs Python >= 3.11"'
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_INDEX)" ]; then \
	  $(PIP) --timeout 5 --retries 0 --index-url $(TORCH_INDEX) $(TORCH) || \
	  { echo "torch: $(TORCH_INDEX) not reachable; falling back to the default index"; $(PIP) $(TORCH); }; \
	else $(PIP) $(TORCH); fi
	$(VPY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt -c constraints.txt
	touch $@

data:
	@bash scripts/get-data.sh

run: setup
	$(VPY) -m experiments.launch --sites 3

test: setup
	$(VPY) -m pytest -q --durations=25

# Mutation testing of the privacy, aggregation and messaging core against the fast unit tests
# ([tool.mutmut] in pyproject.toml); not part of `make test` (it takes about an hour on 2 cores).
# Results per module and every survivor's verdict: TESTING.md.
mutation: setup
	$(PIP) mutmut==3.8.1 -c constraints.txt
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 || true
	$(VPY) scripts/mutation_report.py

clean:
	rm -rf $(VENV) results mutants
