# featseq: `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FEATSEQ := $(VENV)/bin/featseq
DEMO   := demo

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(FEATSEQ) synth $(DEMO)/data --clips 3 --groups 4 --width 96 --height 96
	$(FEATSEQ) featurize $(DEMO)/data/clips --backbone resnet18 --weights none --size 112 --fps 6 --out $(DEMO)/cache/clips_112px.h5
	$(FEATSEQ) cache info $(DEMO)/cache/clips_112px.h5

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(DEMO) .pytest_cache
