# Each target builds its own virtual environment from this repository's files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo sweep experiments lint test test-min docs bench mutate device-check clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	touch $@

$(VENV)/.test: $(VENV)/.created pyproject.toml
	$(PIP) install -e ".[test,examples,lint,wheel]"
	touch $@

# The floors: a second environment with the oldest versions pyproject.toml
# allows (pinned in .ci/min-constraints.txt; pip resolves the rest).
MIN_VENV ?= .venv-min
MIN_PY   := $(MIN_VENV)/bin/python
MIN_PIP  := $(MIN_PY) -m pip --disable-pip-version-check -q

$(MIN_VENV)/.test: pyproject.toml .ci/min-constraints.txt
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PIP) install --upgrade pip
	$(MIN_PIP) install -c .ci/min-constraints.txt -e ".[test,examples,wheel]"
	touch $@

$(VENV)/.docs: $(VENV)/.created pyproject.toml
	$(PIP) install -e ".[docs]"
	touch $@

$(VENV)/.mutate: $(VENV)/.test pyproject.toml
	$(PIP) install -e ".[mutate]"
	touch $@

$(VENV)/.examples: $(VENV)/.created pyproject.toml
	$(PIP) install -e ".[examples]"
	touch $@

$(VENV)/.bench: $(VENV)/.created pyproject.toml
	$(PIP) install -e ".[bench]"
	touch $@

demo: $(VENV)/.examples  ## run the main example: a tiny I-JEPA on digits (~2 min)
	$(PY) examples/ijepa_digits.py

sweep: $(VENV)/.examples  ## momentum sweep, 3 seeds -> docs/momentum_sweep.{png,json} (~15 min)
	$(PY) examples/ijepa_digits.py --sweep --seeds 0 1 2 --out-dir docs

experiments: $(VENV)/.examples  ## EMA Scaling Rule, post-hoc EMA and BN-policy experiments -> docs/ (~25 min)
	$(PY) examples/batch_scaling.py --out-dir docs
	$(PY) examples/posthoc_digits.py --out-dir docs
	$(PY) examples/policy_digits.py --out-dir docs

lint: $(VENV)/.test  ## ruff (lint + format check) over the repository, mypy over jepa_ema/
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint  ## lint and type check, then the whole test suite (doctests included), on every core
	$(PY) -m pytest -q -n auto --dist loadfile

test-min: $(MIN_VENV)/.test  ## the whole test suite on the floors of pyproject.toml (~11 min)
	JEPA_EMA_FLOORS=1 $(MIN_PY) -m pytest -q -n auto --dist loadfile

docs: $(VENV)/.docs  ## build the documentation site into site/ (warnings are errors)
	$(PY) -m mkdocs build --strict

bench: $(VENV)/.bench  ## run the speed/memory benchmarks (~20 min)
	$(PY) benchmarks/ema_bench.py --json benchmarks/results.json \
	  --markdown benchmarks/results.md
	$(PY) benchmarks/options_bench.py --json benchmarks/options_results.json \
	  --markdown benchmarks/options_results.md --plot docs/options_every.png
	$(PY) benchmarks/posthoc_bench.py --json benchmarks/posthoc_results.json

mutate: $(VENV)/.mutate  ## mutation score of the whole package (~2-4 h on 2 cores) -> tools/mutation_results/package.{json,md}
	$(PY) tools/mutate.py --workdir /tmp/jepa_mutate --build-map \
	  --map /tmp/jepa_mutate/coverage_map.json --shuffle --workers 2 \
	  --json tools/mutation_results/package.json \
	  --markdown tools/mutation_results/package.md

device-check: $(VENV)/.bench  ## the accelerator check (one command, ~5 min): results/device_check.{json,md}
	$(PY) benchmarks/device_check.py --out results --budget-s 300

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache site dist
