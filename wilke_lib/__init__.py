"""wilke_lib: a reproducible companion to WilKE (Wise-Layer Knowledge Editor, Hu et al. 2024).

The package root wires the synthetic world in as the named source "toy-world" of records and corpus texts
(`wilke_lib.sources`): the world lives in `organisms`, a layer above `counterfact` and `second_moments`, which read it
through the loaders registered here (imported when first asked for, so `import wilke_lib` stays light).
"""

from wilke_lib import sources as _sources

__version__ = "0.1.0"


def _world_records() -> list[dict]:
    from wilke_lib.organisms.records import counterfact_records
    return counterfact_records()


def _world_corpus() -> list[str]:
    from wilke_lib.organisms.world import WORLD_NAME, load_corpus
    return load_corpus(WORLD_NAME)


_sources.register_records(_sources.TOY_WORLD, _world_records)
_sources.register_corpus(_sources.TOY_WORLD, _world_corpus)
