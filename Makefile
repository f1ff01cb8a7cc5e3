# Two entry points: `make demo` (the main job) and `make test` (the suite). Each sets up .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench screenshot clean

DEPS := $(VENV)/.deps
KERNEL_SRC := setup.py pytest_ait_llm/compare/_kernel.c pytest_ait_llm/compare/_kernel_loops.h

$(DEPS): requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(DEPS)

# The package itself, editable; this also compiles the C comparison pass (gcc), again whenever its source changes.
$(STAMP): $(DEPS) pyproject.toml $(KERNEL_SRC)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# The embedded example: a tiny Llama, its CPU "ATB port" run through --ait-exec, gated by the plugin.
demo: $(STAMP)
	$(BIN)/python examples/llama_port/demo.py

# pytest exits 5 when it collected no test; make then fails, and so does .ci/run.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p xdist -n 2 tests

# Look at the demo's HTML report as a person would (needs Chromium: apt-get install chromium).
screenshot: demo
	$(BIN)/python scripts/report_screenshot.py out/demo/report.html out/demo/report.png

bench: $(STAMP)
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf $(VENV) out
