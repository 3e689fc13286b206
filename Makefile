# The two commands a new user needs: `make quickstart` and `make test`.
# Both create .venv when it is missing and install tunelab (editable, with dev extras) into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed

.PHONY: quickstart test lint docs clean install

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip setuptools wheel
	@bash scripts/install_torch.sh $(PY)
	@# DeepSpeed (train.distributed zero1-3) builds from source against the installed torch; DS_BUILD_OPS=0 leaves
	@# its compiled ops to be built on first use (tunelab's CPU runs need none)
	@DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.17'
	@$(PY) -m pip install -q -e '.[dev,deepspeed]'
	@touch $(STAMP)

quickstart: $(STAMP)
	@$(PY) -m tunelab.quickstart

test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	@$(VENV)/bin/ruff check .

docs: $(STAMP)
	@$(PY) -m tunelab.config.docs > docs/config.md
	@$(PY) scripts/methods_doc.py > docs/methods.md

clean:
	rm -rf runs models .pytest_cache
