# The two set-up commands: `make run` (install, then the quickstart) and `make test` (install, then tests).
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
QUICKDIR  ?= quickstart
STAMP     := $(VENV)/.installed

.PHONY: run test install test-unit test-integration lint crd clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, from this machine's disk (a bare `torch` could pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# deepspeed is an sdist: build without ops, against the torch just installed.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8 hjson==3.1.0
	# lmms-eval: only its scoring functions are used (a test checks the eval metrics against them); --no-deps
	# because its requirements (a CUDA torchvision, wandb, openai, ...) would replace this venv's packages.
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/vlmctl quickstart --dir $(QUICKDIR)

# The tier is the folder (tests/conftest.py marks it), so nothing unmarked is dropped.
test: lint
	bash scripts/test-deps.sh
	$(BIN)/pytest -p no:cacheprovider --durations=30 tests/unit tests/integration

test-unit: install
	$(BIN)/pytest -p no:cacheprovider tests/unit

# Style, layering (import-linter contracts in pyproject.toml) and types (mypy: the torch-free side).
lint: install
	$(BIN)/ruff check operator trainer tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

# The CRD is generated from the typed spec; the chart carries a byte copy (tests fail on drift).
# The chart's RBAC rules are generated from vlm_operator/rbac.py the same way.
crd: install
	$(BIN)/python -m vlm_operator.crd > crds/training.vlm.dev_vlmtrainingjobs.yaml
	cp crds/training.vlm.dev_vlmtrainingjobs.yaml charts/vlm-operator/files/crds/
	$(BIN)/python -m vlm_operator.rbac > charts/vlm-operator/files/rbac.yaml

clean:
	rm -rf $(VENV) $(QUICKDIR)
