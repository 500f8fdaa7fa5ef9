# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch is pinned here; pyproject.toml declares a range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,arviz,plot,data]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m ppl.demo

# pytest exits 5 when it collected no tests; that is a failure here, as is any other non-zero code.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
