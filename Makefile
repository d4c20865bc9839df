# fedmoe: `make run` runs the default federated job, `make test` the test suite.
# Both first run `make setup`: a virtual environment in .venv with the pinned dependencies
# (torch first, from its CPU wheel), the Fashion-MNIST data and docker-compose where apt works.
# Every target is idempotent; setup is skipped when nothing it depends on changed.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fedmoe-setup
TORCH := torch==2.13.0

.PHONY: setup run test data clean

setup: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fedmoe needs Python >= 3.11"'
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(VPY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > $(VENV)/requirements.txt
	$(VPY) -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt -c constraints.txt
	touch $@

data:
	@bash scripts/get-data.sh

run: setup
	$(VPY) -m experiments.launch --sites 3

test: setup
	$(VPY) -m pytest -q

clean:
	rm -rf $(VENV) results
