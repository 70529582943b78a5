"""Model organisms: small GPT-2 and GPT-J architecture models trained on a synthetic world.

* `world`: the synthetic world in CounterFact format (facts, training documents, records);
* `train`: tokenizer and model training (`python -m wilke_lib.organisms --all` = `make organisms`);
* `interventions`: training interventions that shape where facts are kept (off by default);
* `records`: the world's facts as CounterFact records (the record source "toy-world", `wilke_lib.sources`).

Where an organism keeps its facts (`make organism-report`) is an analysis: `wilke_lib.analysis.organism_report`.
The organisms sit above the editors and the lifelong protocol and below the analyses (docs/design.md).
"""

from wilke_lib.organisms.interventions import (NameFinder, PlantedDepth, knockout_mask, mlp_drop_hooks, planted_layer,
                                               silence_mlps)
from wilke_lib.organisms.train import (CHECKPOINT_FILE, ORGANISM_DIR, ORGANISMS, OrganismConfig, build_model, collate,
                                       known_fact_rates, pack_rows, train, train_tokenizer, training_summary)

__all__ = ["CHECKPOINT_FILE", "ORGANISM_DIR", "ORGANISMS", "NameFinder", "OrganismConfig", "PlantedDepth", "build_model", "collate",
           "knockout_mask", "known_fact_rates", "mlp_drop_hooks", "pack_rows", "planted_layer", "silence_mlps",
           "train", "train_tokenizer", "training_summary"]
