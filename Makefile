# WilKE companion: set-up, tests, notebooks and the book.
#   make book                          # venv + every notebook (papermill) on the default organisms + HTML book
#   make book PROFILE=quick MODELS=toy-gpt2
#   make test
SHELL      := /bin/bash
PYTHON3    ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PROFILE    ?= default
MODELS     ?= toy-gpt2 toy-gptj
# Extra arguments for scripts/run_notebooks.py, e.g. NB_ARGS="--only 03 -p n_edits 64"
# Models executed side by side (each notebook uses one torch thread).
JOBS       ?= 2
NB_ARGS    ?=
PYTEST_ARGS ?=
TORCH_VERSION   ?= 2.13.0
# Optional extra index for a CPU-only torch on machines without a GPU (PyPI's Linux torch pulls GBs
# of CUDA wheels), e.g. TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu. Empty by default: the
# pinned torch then comes from the configured indexes / local wheels.
TORCH_CPU_INDEX ?=

.PHONY: venv test book book-only check-site toc organisms organism-report runs ablation-runs consecutive-runs bench bench-success clean distclean help

help:
	@echo "targets: venv test book book-only check-site toc organisms organism-report runs ablation-runs consecutive-runs bench bench-success clean distclean"
	@echo "variables: PROFILE=$(PROFILE) MODELS='$(MODELS)' NB_ARGS='$(NB_ARGS)'"

$(PY):
	$(PYTHON3) -m venv $(VENV)

# The stamp is rebuilt whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ -z "$(TORCH_CPU_INDEX)" ]; then \
	    $(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	  else \
	    $(PY) -m pip install "torch==$(TORCH_VERSION)" --extra-index-url "$(TORCH_CPU_INDEX)"; \
	  fi; \
	fi
	$(PY) -m pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Runs every notebook once per model, regenerates the table of contents and builds the book.
# The book is built even when a notebook failed (its page shows the error); make still fails then.
book: venv
	@status=0; \
	$(PY) scripts/run_notebooks.py --profile $(PROFILE) --models $(MODELS) --jobs $(JOBS) $(NB_ARGS) || status=$$?; \
	$(PY) scripts/make_toc.py --book-dir book && \
	$(VENV)/bin/jupyter-book build book/ || status=$$?; \
	if [ $$status -ne 0 ]; then echo "make book: some step failed (exit $$status), see above" >&2; fi; \
	exit $$status

# Build the HTML book from the executed notebooks already under book/<model>/ (no execution).
book-only: venv
	$(PY) scripts/make_toc.py --book-dir book
	$(VENV)/bin/jupyter-book build book/

# Load every page of book/_build/html in headless Chromium (Debian's chromium + chromium-driver) and
# fail on broken links or images, console errors, raw LaTeX, tracebacks or progress bars in outputs
# and figures without a caption; prints the counts. CHECK_ARGS="--screenshot glance.html" saves a
# screenshot under book/_build/screenshots/.
CHECK_ARGS ?=
check-site: venv
	$(PY) scripts/check_site.py --html-dir book/_build/html $(CHECK_ARGS)

toc: venv
	$(PY) scripts/make_toc.py --book-dir book

# Retrains both organisms side by side, one thread each (the committed weights were trained on one
# thread; about 90 min on a shared core), resumable after an interruption: run it again.
organisms: venv
	@pids=""; for name in toy-gpt2 toy-gptj; do \
	  $(PY) -m wilke_lib.organisms train --name $$name --threads 1 & pids="$$pids $$!"; \
	done; status=0; for pid in $$pids; do wait $$pid || status=$$?; done; exit $$status

# The paper's lifelong runs (1,024 edits x 3 seeds) that are missing from runs/, one per CPU core,
# resumable; RUNS_ARGS="--dry-run" lists them, "--executor slurm" sends them to a cluster.
RUNS_ARGS ?=
runs: venv
	$(PY) -m wilke_lib.run_matrix $(RUNS_ARGS)

# The ablation of Fig. 9 at the paper profile's scale (chapter 04's last section): WilKE's eight variants,
# 256 edits each, seed 9, that are missing from runs/; RUNS_ARGS as above ("--scores eq10" for the paper's).
ablation-runs: venv
	$(PY) -m wilke_lib.run_matrix --ablation $(RUNS_ARGS)

# Consecutive batch editing without rollback (chapter 12): the runs of PROFILE (default: 64 edits in batches
# of 1, 8, 64; paper: 1,024 in batches of 1, 10, 100) that are missing, resumably; the chapter reads them.
consecutive-runs: venv
	OMP_NUM_THREADS=1 $(PY) -m wilke_lib.lifelong.consecutive --profile $(PROFILE) --models $(MODELS)

# Where each organism keeps its facts: organisms/<name>/report.json and a table (about 5 min each).
organism-report: venv
	$(PY) -m wilke_lib.organisms report --all

bench: venv
	$(PY) benchmarks/bench_editors.py

# Success and rollback of one edit per editor on 100 known records of each organism (about 25 min on 2 CPU cores).
bench-success: venv
	$(PY) benchmarks/single_edit_success.py

clean:
	rm -rf book/_build .pytest_cache *.egg-info build dist
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
