# WilKE companion: set-up, tests, notebooks and the book.
#   make book                          # venv + every notebook (papermill) on the default organisms + HTML book
#   make book PROFILE=quick MODELS=toy-gpt2
#   make test / make test-fast         # every test / all but those marked slow
#   make lock / make upgrade-check      # re-lock the exact versions / try the newest ones in .venv-latest
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

.PHONY: venv lock upgrade-check test book book-only check-site toc organisms organism-report ladder-organisms ladder runs ablation-runs consecutive-runs bench bench-success bench-scale clean distclean help

help:
	@echo "targets: venv lock upgrade-check test book book-only check-site toc organisms organism-report ladder-organisms ladder runs ablation-runs consecutive-runs bench bench-success bench-scale clean distclean"
	@echo "variables: PROFILE=$(PROFILE) MODELS='$(MODELS)' NB_ARGS='$(NB_ARGS)'"

$(PY):
	$(PYTHON3) -m venv $(VENV)

# The stamp is rebuilt whenever pyproject.toml or requirements.lock changes. Every package comes at the exact
# version of requirements.lock (torch first, as pinned, from TORCH_CPU_INDEX when given); wilke_lib itself is
# installed editable without resolving anything again.
$(VENV)/.installed: pyproject.toml requirements.lock | $(PY)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ -z "$(TORCH_CPU_INDEX)" ]; then \
	    $(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	  else \
	    $(PY) -m pip install "torch==$(TORCH_VERSION)" --extra-index-url "$(TORCH_CPU_INDEX)"; \
	  fi; \
	fi
	$(PY) -m pip install -r requirements.lock
	$(PY) -m pip install -e '.[dev]' --no-deps
	touch $@

venv: $(VENV)/.installed

# Writes requirements.lock from what $(VENV) holds now (after a deliberate upgrade, checked with upgrade-check).
lock: venv
	@{ echo "# Exact versions of every package of the tested environment (Python 3.11, Linux), installed by make venv."; \
	  echo "# Regenerate with make lock after a deliberate upgrade (make upgrade-check tries the newest versions first)."; \
	  echo "# torch: a local build (e.g. 2.13.0+cpu) is written without its label; make venv installs torch first (TORCH_CPU_INDEX)."; \
	  $(PY) -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -iv '^wilke[-_]lib==' | grep -v '^pip=='; \
	} > requirements.lock.tmp && mv requirements.lock.tmp requirements.lock

# The newest versions of every requirement (torch still as pinned) in a separate venv, and the quick tests there:
# upgrading is a choice, made after this passes (then make lock in an upgraded $(VENV)). Prints what differs
# from the lock. Downloads a lot; .venv-latest is kept between calls.
VENV_LATEST ?= .venv-latest
upgrade-check:
	@[ -x $(VENV_LATEST)/bin/python ] || $(PYTHON3) -m venv $(VENV_LATEST)
	@if [ -z "$(TORCH_CPU_INDEX)" ]; then \
	  $(VENV_LATEST)/bin/python -m pip install "torch==$(TORCH_VERSION)"; \
	else \
	  $(VENV_LATEST)/bin/python -m pip install "torch==$(TORCH_VERSION)" --extra-index-url "$(TORCH_CPU_INDEX)"; \
	fi
	$(VENV_LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager -e '.[dev]' "torch==$(TORCH_VERSION)"
	-$(VENV_LATEST)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -iv '^wilke[-_]lib==' | grep -v '^pip==' | diff <(grep -v '^#' requirements.lock) -
	$(VENV_LATEST)/bin/python -m pytest -q -m "not slow" tests/test_editors.py tests/test_lifelong.py

# Every test (make test: about 17 min on 2 cores); make test-fast leaves out the tests marked slow (organism
# training, the notebooks' runs, benchmarks and edits on the organisms, anything above about 20 s:
# pytest -m "not slow"). PYTEST_ARGS="tests/test_math.py -x" picks files or options.
test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

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
# and figures without a caption, dirty or stale provenance; prints the counts and saves screenshots of the glance
# page and chapter 3 (both organisms) under book/_build/screenshots/ (CHECK_ARGS="--screenshot PAGE" others).
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

# The width ladder (wilke_lib/ladder.py): train its GPT-2 rungs side by side, one thread each, resumably
# (LADDER_WIDTHS="96 192"), then `make ladder` computes each trained rung's ROME (x3 seeds) and FT runs,
# resumably, and writes organisms/ladder.json with the rule's choice (LADDER_ARGS="--proxies" adds the
# single-edit proxies; "--names toy-gpt2-x4-w192 --seeds 9 10" and "... --seeds 11" in two shells use two cores).
LADDER_WIDTHS ?= 96 192 384
LADDER_ARGS ?=
ladder-organisms: venv
	@pids=""; for width in $(LADDER_WIDTHS); do \
	  OMP_NUM_THREADS=1 $(PY) -m wilke_lib.organisms train --name toy-gpt2-w$$width --threads 1 & pids="$$pids $$!"; \
	done; status=0; for pid in $$pids; do wait $$pid || status=$$?; done; exit $$status

ladder: venv
	OMP_NUM_THREADS=1 $(PY) -m wilke_lib.ladder --run $(LADDER_ARGS)

# The paper's lifelong runs (1,024 edits x 3 seeds) that are missing from runs/, one per CPU core,
# resumable; RUNS_ARGS="--dry-run" lists them, "--executor slurm" sends them to a cluster; "--stale" lists the runs
# computed with other code than the current one, "--restamp 4" checks each one's first 4 steps against the current
# code and records it where they agree, "--allow-code-change" continues unfinished runs started with other code.
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

# ROME, MEMIT and WilKE's layer search on a random model of GPT2-XL's shape (1.56 B parameters, 6 GB in float32),
# both delta runners side by side; SCALE_ARGS="--released-rome PATH" adds the released ROME code's compute_v
# (a local checkout of github.com/kmeng01/rome), "--shape gptj --device cuda" GPT-J's shape, "--steps 5" fewer
# fixed steps. Writes benchmarks/results/scale-<device>.csv/.png (hours on a CPU: see benchmarks/bench_scale.py).
SCALE_ARGS ?=
bench-scale: venv
	$(PY) benchmarks/bench_scale.py $(SCALE_ARGS)

clean:
	rm -rf book/_build .pytest_cache *.egg-info build dist
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
