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
	$(FEATSEQ) synth $(DEMO)/data --clips 8 --groups 4 --width 64 --height 64 --long-videos 0
	$(FEATSEQ) featurize $(DEMO)/data/clips --backbone resnet18 --weights none --size 64 --fps 6 --out $(DEMO)/cache/clips_64px.h5
	$(FEATSEQ) cache info $(DEMO)/cache/clips_64px.h5
	$(FEATSEQ) sweep $(DEMO)/cache/clips_64px.h5 --out $(DEMO)/sweep --model mlp,frame,lstm,gru,conv1d --fps 2 --split group --epochs 40 --patience 15 --jobs 2
	$(PY) -c "import torch; from featurize.synth import render_long_video as r; r('$(DEMO)/data/long_change.mp4', parts=[('ascending', 20.0), ('descending', 20.0)], width=64, height=64, video_fps=30, seed=5)"
	$(FEATSEQ) predict $(DEMO)/sweep/model=conv1d $(DEMO)/data/long_change.mp4 --window 6 --stride 3
	$(FEATSEQ) report $(DEMO)/sweep --out $(DEMO)/report.html
	@echo "report: $(DEMO)/report.html"

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(DEMO) .pytest_cache
