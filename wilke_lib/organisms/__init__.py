"""Model organisms: small GPT-2 and GPT-J architecture models trained on a synthetic world.

* `world`: the synthetic world in CounterFact format (facts, training documents, records);
* `train`: tokenizer and model training (`python -m wilke_lib.organisms --all` = `make organisms`);
* `interventions`: training interventions that shape where facts are kept (off by default);
* `report`: where an organism keeps its facts (`make organism-report`).
"""

from wilke_lib.organisms.interventions import (NameFinder, PlantedDepth, knockout_mask, mlp_drop_hooks, planted_layer,
                                               silence_mlps)
from wilke_lib.organisms.train import (CHECKPOINT_FILE, ORGANISM_DIR, ORGANISMS, OrganismConfig, build_model, collate,
                                       known_fact_rates, pack_rows, train, train_tokenizer, training_summary)

__all__ = ["CHECKPOINT_FILE", "ORGANISM_DIR", "ORGANISMS", "NameFinder", "OrganismConfig", "PlantedDepth", "build_model", "collate",
           "knockout_mask", "known_fact_rates", "mlp_drop_hooks", "pack_rows", "planted_layer", "silence_mlps",
           "train", "train_tokenizer", "training_summary"]
