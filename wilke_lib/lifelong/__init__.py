"""Lifelong editing (Hu et al. 2024, Appendix F): configuration, on-disk store, runner.

* `config`: `LifelongConfig`, `CheckpointPolicy`, a run's identity and directory;
* `store`: the files of a run, its lock, resume and read-back;
* `monitor`: the toxicity monitor the runner calls at every step (Eq. 7);
* `runner`: `run_lifelong`, `run_many`, the records split and the evaluation (Eq. 12-16);
* `provenance`: the code a run was computed with (config.json's "code"), refused mixes on resume;
* `restamp`: a stale run checked against the current code on its first steps, and re-stamped.
"""

from wilke_lib.lifelong.config import (CheckpointPolicy, LifelongConfig, checkpoint_steps, records_fingerprint,
                                       resolve_hparams, run_dir, run_identity)
from wilke_lib.lifelong.runner import (Backend, default_backend, evaluate_edit, lifelong_dir, predefined_layers,
                                       prepare_edit_cache, run_lifelong, run_many, split_records)
from wilke_lib.lifelong.provenance import CodeChangedError
from wilke_lib.lifelong.restamp import Restamp, restamp
from wilke_lib.lifelong.store import RunLockedError, RunResult, load_run, read_back, read_progress, toxicity_snapshots

__all__ = ["Backend", "CheckpointPolicy", "CodeChangedError", "LifelongConfig", "Restamp", "RunLockedError",
           "RunResult", "checkpoint_steps", "default_backend", "evaluate_edit", "lifelong_dir", "load_run",
           "predefined_layers", "prepare_edit_cache", "read_back", "read_progress", "records_fingerprint",
           "resolve_hparams", "restamp", "run_dir", "run_identity", "run_lifelong", "run_many", "split_records",
           "toxicity_snapshots"]
