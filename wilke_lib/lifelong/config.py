"""What a lifelong run is: its configuration and its identity (its checkpoint schedule: `wilke_lib.schedule`).

A run's identity is everything its numbers depend on: the model (`models.model_key`: its name and a
fingerprint of its files), the editor and every hyper-parameter, the seed, the number of edits, the
records (a fingerprint of the list actually passed), the known-record filter, the checkpoint
schedule and the format version. Its directory is named after a hash of the identity, so that a
retrained organism or a changed setting is a new run, never a stale one read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wilke_lib.hparams import editor_of, load_hparams
from wilke_lib.models import canonical_model_name, model_key
from wilke_lib.results import bounded_name, digest, plain
from wilke_lib.schedule import CheckpointPolicy, checkpoint_steps

FORMAT_VERSION = 2
MAX_SEED = 2**63 - 1
"""The largest seed a run accepts (a 64-bit signed int, what every seeded generator takes)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LifelongConfig:
    """One lifelong run. The run's identity (hence its directory) is everything except
    `records_source`, `out_dir`, `eval_batch_size` and `save_every`, plus the model's key and a
    fingerprint of the records actually passed.

    hparams: an editor hyper-parameter dataclass; None -> `load_hparams(editor, model_name)`;
    a string -> `load_hparams(editor, that string)` (e.g. another model's file).
    filter_known: False when the caller already passes known records only.
    toxicity_layers: layers whose toxicity (Eq. 7, W - W_0) is recorded at every step (norms) and at
    powers of two (block-averaged matrices); None = the editor's predefined layer(s).
    """

    model_name: str
    editor: str
    hparams: Any = None
    records_source: str = "counterfact"
    n_edits: int = 32
    seed: int = 9
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    out_dir: str = "runs/lifelong"
    eval_batch_size: int = 64
    save_every: int = 1
    filter_known: bool = True
    toxicity_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("n_edits", "seed", "eval_batch_size", "save_every"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"LifelongConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.n_edits < 1 or self.eval_batch_size < 1 or self.save_every < 1:
            raise ValueError(f"LifelongConfig: n_edits, eval_batch_size and save_every must be >= 1, got "
                             f"{self.n_edits}, {self.eval_batch_size}, {self.save_every}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"LifelongConfig.seed must be between 0 and 2**63 - 1 = {MAX_SEED}, got {self.seed} "
                             "(random.Random and torch.manual_seed take it)")
        if isinstance(self.model_name, str) and (not self.model_name.strip() or self.model_name != self.model_name.strip()):
            raise ValueError(f"LifelongConfig.model_name must be a model name or folder without white space at "
                             f"either end, e.g. 'toy-gpt2', got {self.model_name!r}")
        layers = self.toxicity_layers
        if layers is not None and not (isinstance(layers, (list, tuple)) and all(_is_int(l) and l >= 0 for l in layers)):
            raise TypeError(f"LifelongConfig.toxicity_layers must be layer indices (ints >= 0) or None, got "
                            f"{self.toxicity_layers!r}")


def resolve_hparams(config: LifelongConfig) -> Any:
    """The hyper-parameter object handed to the editor (see `LifelongConfig.hparams`); ValueError when
    the object belongs to another editor than `config.editor`."""
    if config.hparams is None or isinstance(config.hparams, str):
        return load_hparams(config.editor, config.hparams or config.model_name)
    try:
        owner = editor_of(config.hparams)
    except TypeError:  # not one of the library's classes (a custom backend's)
        return config.hparams
    if owner != config.editor:
        raise ValueError(f"LifelongConfig: editor {config.editor!r} but hyper-parameters of {owner!r} "
                         f"({type(config.hparams).__name__})")
    return config.hparams


def records_fingerprint(records: Sequence[dict]) -> str:
    """sha256 of the records' canonical JSON (order matters)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(rec, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def run_identity(config: LifelongConfig, records: Sequence[dict] | str, hparams: Any = None) -> dict[str, Any]:
    """What makes two runs the same run (the dict hashed into the run directory's name).

    `records` is the record list or its `records_fingerprint`. The code is not part of it (a refactor must
    not orphan the committed runs): `provenance` records it beside the identity, in config.json."""
    hp = resolve_hparams(config) if hparams is None else hparams
    fp = records if isinstance(records, str) else records_fingerprint(records)
    name = canonical_model_name(config.model_name)  # an organism by its folder path is the organism
    return {"model_name": name, "model_key": model_key(name),
            "editor": config.editor, "hparams_class": type(hp).__name__, "hparams": plain(hp),
            "seed": config.seed, "n_edits": config.n_edits, "records_fingerprint": fp,
            "filter_known": config.filter_known, "checkpoints": plain(config.checkpoints),
            "toxicity_layers": list(config.toxicity_layers) if config.toxicity_layers is not None else None,
            "format_version": FORMAT_VERSION}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def run_dir(base: str | Path, config: LifelongConfig, records: Sequence[dict] | str, hparams: Any = None) -> Path:
    """Directory of the run: `<base>/<model>__<editor>__n<n>__seed<seed>__<hash of identity>`."""
    key = digest(run_identity(config, records, hparams))
    model = bounded_name(slug(Path(config.model_name).name))  # a long folder name would pass 255 bytes
    name = f"{model}__{slug(config.editor)}__n{config.n_edits}__seed{config.seed}__{key[:12]}"
    return Path(base) / name


def config_to_dict(config: LifelongConfig, hparams: Any) -> dict[str, Any]:
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["hparams"] = plain(hparams)
    out["checkpoints"] = dataclasses.asdict(config.checkpoints)
    return json.loads(json.dumps(plain(out), default=str))


def config_from_dict(d: dict[str, Any]) -> LifelongConfig:
    d = dict(d)
    ck = {k: v for k, v in dict(d.get("checkpoints") or {}).items() if k != "__type__"}
    ck["extra"] = tuple(ck.get("extra", ()))
    d["checkpoints"] = CheckpointPolicy(**ck)
    if d.get("toxicity_layers") is not None:
        d["toxicity_layers"] = tuple(d["toxicity_layers"])
    names = {f.name for f in dataclasses.fields(LifelongConfig)}
    return LifelongConfig(**{k: v for k, v in d.items() if k in names})
