"""wilke_lib: a reproducible companion to WilKE (Wise-Layer Knowledge Editor, Hu et al. 2024).

The package root wires the synthetic worlds in as named sources of records and corpus texts ("toy-world", the
organisms'; "toy-world-x4", the width ladder's heavier world)
(`wilke_lib.sources`): the world lives in `organisms`, a layer above `counterfact` and `second_moments`, which read it
through the loaders registered here (imported when first asked for, so `import wilke_lib` stays light).
"""

from wilke_lib import sources as _sources

__version__ = "0.1.0"


def _world_records(name: str):
    def load() -> list[dict]:
        from wilke_lib.organisms.records import counterfact_records
        from wilke_lib.organisms.world import world_named
        return counterfact_records(world_named(name))
    return load


def _world_corpus(name: str):
    def load() -> list[str]:
        from wilke_lib.organisms.world import load_corpus
        return load_corpus(name)
    return load


for _name in _sources.WORLDS:
    _sources.register_records(_name, _world_records(_name))
    _sources.register_corpus(_name, _world_corpus(_name))
