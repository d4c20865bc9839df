# fedmoe: `make run` runs the default federated job, `make test` the test suite.
# Both first run `make setup`: a virtual environment in .venv with the pinned dependencies
# (torch first, from its CPU wheel), the Fashion-MNIST data and docker-compose where apt works.
# Every target is idempotent; setup is skipped when nothing it depends on changed.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fedmoe-setup
TORCH := torch==2.13.0

.PHONY: setup run test data clean mutation

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

# Mutation testing of the privacy, aggregation and messaging core against the fast unit tests
# ([tool.mutmut] in pyproject.toml); not part of `make test` (it takes about an hour on 2 cores).
# Results per module and every survivor's verdict: TESTING.md.
mutation: setup
	$(VPY) -m pip install --quiet --disable-pip-version-check mutmut==3.8.1 -c constraints.txt
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 || true
	$(VPY) scripts/mutation_report.py

clean:
	rm -rf $(VENV) results mutants
