# Each target builds its own virtual environment from this repository's files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	touch $@

$(VENV)/.test: $(VENV)/.created pyproject.toml
	$(PIP) install -e ".[test,examples]"
	touch $@

$(VENV)/.examples: $(VENV)/.created pyproject.toml
	$(PIP) install -e ".[examples]"
	touch $@

$(VENV)/.bench: $(VENV)/.created pyproject.toml
	$(PIP) install -e ".[bench]"
	touch $@

demo: $(VENV)/.examples  ## run the main example: a tiny I-JEPA on digits (~2-3 min)
	$(PY) examples/ijepa_digits.py

test: $(VENV)/.test  ## run the whole test suite (doctests included)
	$(PY) -m pytest -q

bench: $(VENV)/.bench  ## run the speed/memory benchmarks (~20 min)
	$(PY) benchmarks/ema_bench.py --json benchmarks/results.json \
	  --markdown benchmarks/results.md
	$(PY) benchmarks/options_bench.py --json benchmarks/options_results.json \
	  --markdown benchmarks/options_results.md --plot docs/options_every.png

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
