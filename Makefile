# featseq: `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FEATSEQ := $(VENV)/bin/featseq
DEMO   := demo

.PHONY: install test demo bench study clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --durations=15

# Reruns from any state of demo/ (finished, half-finished, interrupted): synth keeps the videos it already rendered,
# featurize, cache merge and sweep resume, and the steps that write a fresh folder (compare, finetune, predict) start
# from an empty one.
demo: install
	$(FEATSEQ) synth $(DEMO)/data --clips 8 --groups 4 --width 64 --height 64 --long-videos 0
	$(FEATSEQ) synth $(DEMO)/data_hi --clips 8 --groups 4 --width 192 --height 192 --long-videos 0
	# two shards in two processes (one thread each), then one verified merge
	( OMP_NUM_THREADS=1 $(FEATSEQ) featurize $(DEMO)/data/clips --backbone resnet18 --weights none --size 64 --fps 6 --out $(DEMO)/cache/clips_64px.h5 --shard 0/2 -q & \
	  p=$$!; OMP_NUM_THREADS=1 $(FEATSEQ) featurize $(DEMO)/data/clips --backbone resnet18 --weights none --size 64 --fps 6 --out $(DEMO)/cache/clips_64px.h5 --shard 1/2 -q; \
	  s=$$?; wait $$p && [ $$s -eq 0 ] )
	$(FEATSEQ) cache merge $(DEMO)/cache/clips_64px.h5
	# two decode worker processes feed the CNN
	$(FEATSEQ) featurize $(DEMO)/data_hi/clips --backbone resnet18 --weights none --size 64 --fps 6 --decode-workers 2 --out $(DEMO)/cache/clips_hi_64px.h5
	$(FEATSEQ) cache list --cache-dir $(DEMO)/cache
	$(FEATSEQ) sweep $(DEMO)/cache/clips_64px.h5 --out $(DEMO)/sweep --model mlp,frame,lstm,gru,conv1d --fps 2 --split group --epochs 40 --patience 15 --jobs 2
	# a TPE search over ranges with median pruning (an Optuna study, two workers)
	$(FEATSEQ) sweep $(DEMO)/cache/clips_64px.h5 --out $(DEMO)/search --search tpe --trials 12 --prune median --model conv1d,lstm --hidden 16..128:log:int --lr 1e-4..1e-2:log --fps 2 --split group --epochs 30 --jobs 2 -q
	rm -rf $(DEMO)/compare $(DEMO)/finetune $(DEMO)/predict $(DEMO)/stream
	$(FEATSEQ) compare $(DEMO)/cache/clips_64px.h5 $(DEMO)/cache/clips_hi_64px.h5 --out $(DEMO)/compare --model conv1d,mlp --seeds 2 --fps 2 --split group --epochs 40 --patience 15
	BEST=$$(sed -n 2p $(DEMO)/sweep/leaderboard.csv | cut -d, -f2) && \
	$(FEATSEQ) finetune $(DEMO)/cache/clips_64px.h5 --from "$(DEMO)/sweep/$$BEST" --out $(DEMO)/finetune --unfreeze 1 --epochs 2 --overwrite -q && \
	echo "which moments of each clip drove the fine-tuned model, and where in the frame (Grad-CAM)" && \
	$(FEATSEQ) explain $(DEMO)/finetune --gradcam 2 --max-plots 4 && \
	$(PY) -c "import torch; from featseq.featurize.synth import render_long_video as r; r('$(DEMO)/data/long_change.mp4', parts=[('ascending', 20.0), ('descending', 20.0)], width=64, height=64, video_fps=30, seed=5)" && \
	$(FEATSEQ) predict "$(DEMO)/sweep/$$BEST" $(DEMO)/data/long_change.mp4 --window 6 --stride 3 --out $(DEMO)/predict && \
	$(PY) -c "from featseq.featurize.synth import render_long_video as r; r('$(DEMO)/data/stream_change.mp4', parts=[('ascending', 8.0), ('descending', 8.0)], width=64, height=64, video_fps=30, seed=6)" && \
	echo "a live stream: a 16 s video played at its rate, one line per window" && \
	$(FEATSEQ) predict "$(DEMO)/sweep/$$BEST" --stream $(DEMO)/data/stream_change.mp4 --realtime --stride 1 --positive-windows 3 --out $(DEMO)/stream
	$(FEATSEQ) report $(DEMO)/sweep $(DEMO)/search $(DEMO)/compare $(DEMO)/finetune $(DEMO)/predict --out $(DEMO)/report.html
	@echo "report: $(DEMO)/report.html"

bench: install
	$(PY) bench/run.py

# the Gingerbread study from scratch (needs ../shared): caches under cache/gingerbread_study, writes docs/gingerbread.md
study: install
	$(PY) bench/gingerbread_study.py --fresh

clean:
	rm -rf $(DEMO) .pytest_cache
