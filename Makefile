# Two entry points: `make test` (lint, import layering, the suite offline, mergekit and FusionBench parity)
# and `make demo`. Both create their virtual environments on first use. torch is pinned to the CPU
# build through constraints.txt so that no multi-GB CUDA wheel is pulled.
PY ?= python3
VENV := .venv
MKVENV := .venv-mergekit
FBVENV := .venv-fusionbench
PIP_QUIET := -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test demo lint venv mergekit-venv fusionbench-venv bench-merge bench-opcm readme-methods clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) -c constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/pip install $(PIP_QUIET) -c constraints.txt -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -c "import mergeforge, torch, transformers"
	touch $@

mergekit-venv: $(MKVENV)/.installed
$(MKVENV)/.installed: constraints.txt
	$(PY) -m venv $(MKVENV)
	$(MKVENV)/bin/pip install $(PIP_QUIET) -c constraints.txt torch==2.13.0 mergekit==0.1.5 2>&1 | grep -v "is ignored" || true
	$(MKVENV)/bin/python -c "import mergekit"
	touch $@

fusionbench-venv: $(FBVENV)/.installed
$(FBVENV)/.installed: constraints.txt
	$(PY) -m venv $(FBVENV)
	$(FBVENV)/bin/pip install $(PIP_QUIET) -c constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(FBVENV)/bin/pip install $(PIP_QUIET) -c constraints.txt fusion-bench==0.2.33 "transformers<5" 2>&1 | grep -v "is ignored" || true
	$(FBVENV)/bin/python -c "import fusion_bench"
	touch $@

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

test: venv mergekit-venv fusionbench-venv lint
	MERGEKIT_PYTHON=$(CURDIR)/$(MKVENV)/bin/python MERGEKIT_YAML=$(CURDIR)/$(MKVENV)/bin/mergekit-yaml \
	FUSIONBENCH_PYTHON=$(CURDIR)/$(FBVENV)/bin/python \
	MERGEFORGE_REQUIRE_PARITY=1 $(VENV)/bin/python -m pytest -q

demo: venv
	$(VENV)/bin/python examples/demo.py

bench-merge: venv mergekit-venv
	MERGEKIT_YAML=$(CURDIR)/$(MKVENV)/bin/mergekit-yaml $(VENV)/bin/python benchmarks/merge_speed.py

bench-opcm: venv
	$(VENV)/bin/python benchmarks/opcm_memory.py

readme-methods: venv
	$(VENV)/bin/python scripts/update_readme_methods.py

clean:
	rm -rf $(VENV) $(MKVENV) $(FBVENV) .pytest_cache .ruff_cache
