"""Named sources of records and of corpus texts: what `counterfact.load_counterfact(name)` and the second
moments (`second_moments.second_moments(..., corpus=name)`) read when given a name rather than a file.

The library's named sources are the synthetic worlds, "toy-world" (the organisms') and "toy-world-x4" (the width
ladder's heavier world, issue 32): their records and their corpora live in
`organisms`, above the data layer that reads them (docs/design.md, the layers). The package root
(`wilke_lib/__init__.py`) registers them here, lazily (nothing is imported until a name is asked for), so
the world reaches `counterfact`, `stats` and, through the statistics, the editors as an injected loader,
never as an import. A caller may register other names, or pass a loader of its own
(`second_moments.second_moments(..., corpus_loader=...)`, `editors.cache.EditCache(corpus_loader=...)`).

Import-light: the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TOY_WORLD = "toy-world"
"""The name of the synthetic world (`organisms.world.WORLD_NAME`), as a record source and as a corpus."""
HEAVY_WORLD = "toy-world-x4"
"""The width ladder's tier-2 world, four times as heavy (`organisms.world.HEAVY_WORLD_NAME`)."""
WORLDS = (TOY_WORLD, HEAVY_WORLD)

_RECORDS: dict[str, Callable[[], list[dict]]] = {}
_CORPORA: dict[str, Callable[[], list[str]]] = {}


def register_records(name: str, loader: Callable[[], list[dict]]) -> None:
    """Make `name` a record source: `loader()` gives its CounterFact records."""
    _RECORDS[name] = loader


def register_corpus(name: str, loader: Callable[[], list[str]]) -> None:
    """Make `name` a corpus: `loader()` gives its texts."""
    _CORPORA[name] = loader


def record_sources() -> tuple[str, ...]:
    """The registered names of record sources."""
    return tuple(_RECORDS)


def named_records(name: str) -> list[dict]:
    """The records of the source registered as `name`; KeyError when there is none."""
    return _RECORDS[name]()


def load_corpus(name_or_path: str) -> list[str]:
    """Texts for second-moment statistics: a registered corpus by name ("toy-world": the world's first-epoch
    documents), or a local text file (one text per non-empty line) for real models."""
    if name_or_path in _CORPORA:
        return _CORPORA[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        named = ", ".join(repr(n) for n in _CORPORA) or "none registered"
        raise FileNotFoundError(
            f"corpus {name_or_path!r}: not a named corpus ({named}) and no such file; "
            "for real models give a local text file with one text per line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
