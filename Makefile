# The two commands a newcomer needs: `make demo` (the whole flow on offline demo data, then a short jam) and
# `make test`. Both create or reuse .venv and install system packages where they can (root + apt).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test venv sysdeps lint bench repro ui clean-data

venv: $(STAMP)

# basic-pitch is installed without its dependencies: on Python 3.11 it pins tensorflow<2.15.1 (and so numpy<2,
# ~600 MB). We run its shipped ONNX model through onnxruntime, listed in pyproject.toml with its real needs.
# transkun too: it requires torchaudio (no release matches our torch; we provide the one function it calls,
# pipeline/data/transcribers/melscale.py), plus training/CLI-only packages (tensorboard, sox, pydub, ncls,
# moduleconf, seaborn, torch-optimizer). Inference needs torch, numpy, scipy, pretty_midi, mir_eval: all listed.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps basic-pitch==0.4.0 transkun==2.0.1
	@# a venv made before transformers was capped below 5.25 may hold `kernels` (see pyproject.toml): it goes
	$(BIN)/python -m pip uninstall -q -y kernels 2>/dev/null || true
	@touch $@

# fluidsynth + a GM soundfont render the demo piano; jackd2 gives real MIDI ports without ALSA.
# Without root/apt the code falls back (plain synth, file transport) and says so.
sysdeps:
	@missing=""; \
	command -v fluidsynth >/dev/null || missing="$$missing fluidsynth"; \
	test -f /usr/share/sounds/sf2/FluidR3_GM.sf2 || missing="$$missing fluid-soundfont-gm"; \
	command -v jackd >/dev/null || missing="$$missing jackd2"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null \
	      || echo "warning: could not install$$missing; falling back where possible"; \
	  else echo "warning: missing$$missing (need root + apt); falling back where possible"; fi; \
	fi

# A held-out piece of each demo player plays "the human": a classical one cut into phrases with rests, which the
# champion's classical adapter answers (call-and-response); then a folk tune, which its folk adapter accompanies
# (continuous). $(call piece,STYLE): the first test piece of STYLE.
piece = $$($(BIN)/python -c "import json; s = json.load(open('data/split/split.json'))['styles']['$(1)']; \
	print('data/clean/style/' + sorted(s['test'])[0] + '.mid')")

# The blend check plays 5 weights: on 3 of evaluate's 5 seeds (24 samples a weight) it generates 3/5 of the ids;
# its span (0.12 -> 1.00 on the demo) is far above the 0.5 it needs.
demo: venv sysdeps
	$(BIN)/jam run
	$(BIN)/jam phrases "$(call piece,classical)" out/demo-phrases.mid
	$(BIN)/jam play --input out/demo-phrases.mid -a classical --record out/demo-jam.mid --seed 0
	$(BIN)/jam play --input "$(call piece,folk)" -a folk --mode continuous --record out/demo-accompany.mid \
	  --duration-s 15 --seed 0
	$(BIN)/jam evaluate --blend classical,folk --check --set 'evaluate.seeds=[0,1,2]'
	$(BIN)/jam show out/demo-jam.mid
	@if command -v fluidsynth >/dev/null && [ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]; then \
	  fluidsynth -ni -q -F out/demo-jam.wav -r 44100 /usr/share/sounds/sf2/FluidR3_GM.sf2 out/demo-jam.mid >/dev/null \
	  && echo "listen: out/demo-jam.wav"; fi

test: venv sysdeps
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: venv sysdeps
	$(BIN)/python bench/dataflow.py
	$(BIN)/python bench/transcribe.py

repro: venv sysdeps
	$(BIN)/dvc repro

ui: venv
	$(BIN)/jam ui
