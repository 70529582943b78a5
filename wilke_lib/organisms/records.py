"""The synthetic world's facts as CounterFact records (Meng et al. 2022a), for evaluation and editing."""

from __future__ import annotations

import random

from wilke_lib.organisms.world import DEFAULT_SPEC, World, WorldSpec, build_world, prefix_sentence


def counterfact_records(spec: WorldSpec | int = DEFAULT_SPEC, n_neighbours: int = 10,
                        n_attributes: int = 10) -> list[dict]:
    """One record in the full CounterFact schema for every fact of the world.

    The rewrite prompt is one template of the relation; the paraphrase prompts are two other
    templates behind an unrelated prefix sentence; the neighbourhood prompts are other subjects with
    the same relation and true object; the attribute prompts other subjects whose true object is
    the new target. Two extra fields (the CounterFact schema is otherwise unchanged): `famous` marks
    the single-token, frequently mentioned subjects, `prompted` those whose facts the training text
    also states as prompts (the others' facts appear only in biographies and descriptors).
    """
    world = build_world(spec)
    rng = random.Random(world.seed + 2)
    by_object: dict[tuple[str, str], list[str]] = {}
    for f in world.facts:
        by_object.setdefault((f.relation_id, f.obj), []).append(f.subject)
    records = []
    for case_id, fact in enumerate(world.facts):
        relation = world.relations[fact.relation_id]
        templates = list(relation.templates)
        rng.shuffle(templates)
        new = rng.choice([o for o in relation.objects if o != fact.obj])

        def prompts_for(subjects: list[str], n: int) -> list[str]:
            chosen = rng.sample(subjects, min(n, len(subjects)))
            return [rng.choice(relation.templates).format(s) for s in chosen]

        neighbours = [s for s in by_object[(fact.relation_id, fact.obj)] if s != fact.subject]
        records.append({
            "case_id": case_id,
            "pararel_idx": case_id,
            "requested_rewrite": {
                "prompt": templates[0],
                "relation_id": fact.relation_id,
                "target_new": {"str": new, "id": world.object_ids[new]},
                "target_true": {"str": fact.obj, "id": world.object_ids[fact.obj]},
                "subject": fact.subject,
            },
            "paraphrase_prompts": [f"{prefix_sentence(rng)} {t.format(fact.subject)}" for t in templates[1:3]],
            "neighborhood_prompts": prompts_for(neighbours, n_neighbours),
            "attribute_prompts": prompts_for(by_object.get((fact.relation_id, new), []), n_attributes),
            "generation_prompts": [f"{fact.subject} is known for", f"People say that {fact.subject}"],
            "famous": fact.subject in world.famous,
            "prompted": fact.subject in world.prompted,
        })
    return records


def relation_table(world: World) -> list[dict]:
    """One row per relation: what the world contains, for the book."""
    return [{"relation": r.relation_id, "subjects": r.subject_kind, "templates": len(r.templates),
             "example template": r.templates[0], "objects": len(r.objects),
             "facts": len(world.facts_of(r.relation_id))} for r in world.relations.values()]


def mention_counts(world: World) -> list[int]:
    """Documents per epoch of each subject (the Zipf-like skew; famous subjects at the top)."""
    return [world.docs_per_epoch[s] for names in world.subjects.values() for s in names]
