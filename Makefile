# Two commands a new user needs: `make bench` and `make test`. Both create .venv and install the suite
# into it (editable, with the dev tools) when it is missing or older than setup.cfg / pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The formatter wraps code at 100; docstrings and comments may run to 110.
RUFF_FLAGS := --target-version py310 --config "line-length = 100"
RUFF_CHECK := --config "lint.pycodestyle.max-line-length = 110"
RUFF_RULES := E,F,W,I,B,UP,NPY,RUF
CONFIG ?= benchmarks/configs/default.yaml

.PHONY: install bench test lint format microbench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -c "import torchvision.ops, cv2.ximgproc; torchvision.ops.nms"
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/rcnn-bench run --config $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check $(RUFF_FLAGS) .
	$(VENV)/bin/ruff check $(RUFF_FLAGS) $(RUFF_CHECK) --select $(RUFF_RULES) .

format: $(STAMP)
	$(VENV)/bin/ruff format $(RUFF_FLAGS) .
	$(VENV)/bin/ruff check --fix $(RUFF_FLAGS) $(RUFF_CHECK) --select $(RUFF_RULES) .

microbench: $(STAMP)
	$(VENV)/bin/pytest benchmarks/micro --benchmark-enable --benchmark-only \
		--benchmark-autosave --benchmark-storage=reports/microbench

clean:
	rm -rf build $(VENV) .pytest_cache .ruff_cache
