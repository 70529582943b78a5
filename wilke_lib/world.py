"""A synthetic knowledge world in CounterFact format.

No machine of this project can download GPT2-XL or CounterFact (Meng et al. 2022a), so the model
organisms learn an invented world instead: invented subjects (no real-world truth implied), real
CounterFact relation ids, several ParaRel-style templates per relation (Elazar et al. 2021), objects
from each relation's closed vocabulary, and a Zipf-like skew in how often subjects are mentioned, so
that some facts are far more frequent than others, as in web text.

Everything is a pure function of the seed: ``build_world(seed)`` gives the facts, ``corpus(world)``
the training sentences, ``counterfact_records(world)`` the evaluation records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

WORLD_NAME = "toy-world"
DEFAULT_SEED = 0

LANGUAGES = ["French", "English", "Spanish", "German", "Italian", "Dutch", "Swedish", "Polish",
             "Russian", "Japanese", "Finnish", "Greek", "Portuguese", "Danish", "Korean", "Turkish"]
RELIGIONS = ["Christianity", "Islam", "Buddhism", "Judaism", "Hinduism", "Taoism", "Sikhism",
             "Shinto"]
CONTINENTS = ["Europe", "Asia", "Africa", "Antarctica", "Oceania", "North America",
              "South America"]


@dataclass(frozen=True)
class Relation:
    """A CounterFact relation: its Wikidata id, the kind of subject it applies to, its templates."""

    relation_id: str
    subject_kind: str
    templates: tuple[str, ...]
    objects: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation_id: str
    obj: str
    weight: float  # how popular the subject is (Zipf-like); sets how often the fact is mentioned


@dataclass
class World:
    seed: int
    relations: dict[str, Relation]
    subjects: dict[str, list[str]]  # kind -> subject names
    facts: list[Fact]
    object_ids: dict[str, str] = field(default_factory=dict)

    def facts_of(self, relation_id: str) -> list[Fact]:
        return [f for f in self.facts if f.relation_id == relation_id]


# --- invented names ---------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "tr", "st", "th", "sh", "ch", "v", "h", "j", "w", "y"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ea", "io", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk"]


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
             for _ in range(syllables)]
    return "".join(parts).capitalize()


def _unique_names(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = make(rng)
        if name not in taken and len(name) > 3:
            taken.add(name)
            names.append(name)
    return names


def _person(rng: random.Random) -> str:
    return f"{_word(rng, rng.choice([1, 2]))} {_word(rng, 2)}"


def _place(rng: random.Random) -> str:
    return _word(rng, rng.choice([2, 2, 3]))


def _product(rng: random.Random) -> str:
    return f"{_word(rng, 2)} {rng.choice(['One', 'Pad', 'Max', 'Go', 'Pro', 'Lite', 'Air', 'X'])}"


def _organisation(rng: random.Random) -> str:
    return f"{_word(rng, 2)} {rng.choice(['Group', 'Works', 'Labs', 'Media', 'Systems', 'Foods'])}"


def _relations(rng: random.Random, taken: set[str]) -> dict[str, Relation]:
    cities = _unique_names(rng, 24, _place, taken)
    countries = _unique_names(rng, 14, _place, taken)
    companies = _unique_names(rng, 16, lambda r: _word(r, 2), taken)
    leagues = [f"{name} League" for name in _unique_names(rng, 10, lambda r: _word(r, 2), taken)]
    rel = [
        Relation("P103", "person", ("The mother tongue of {} is", "{} is a native speaker of",
                                    "{}'s mother tongue is", "{} spoke the language"),
                 tuple(LANGUAGES)),
        Relation("P140", "person", ("{} follows the religion of", "{} is affiliated with the "
                                    "religion of", "The religion of {} is", "{} is a follower of"),
                 tuple(RELIGIONS)),
        Relation("P27", "person", ("{} is a citizen of", "{} holds a citizenship of",
                                   "{}, who is a citizen of", "The citizenship of {} is"),
                 tuple(countries)),
        Relation("P19", "person", ("{} was born in", "{} is originally from",
                                   "The birthplace of {} is", "{} was born in the city of"),
                 tuple(cities)),
        Relation("P463", "person", ("{} is a member of the", "{} belongs to the",
                                    "{} is affiliated with the", "{} joined the"), tuple(leagues)),
        Relation("P30", "place", ("{} is located in the continent of", "{} is a part of the "
                                  "continent of", "{} belongs to the continent of",
                                  "The continent of {} is"), tuple(CONTINENTS)),
        Relation("P36", "place", ("The capital of {} is", "{}'s capital city,",
                                  "{}, which has the capital", "The capital city of {} is"),
                 tuple(cities)),
        Relation("P37", "place", ("The official language of {} is", "In {}, the official "
                                  "language is", "{}'s official language is",
                                  "The language of {} is"), tuple(LANGUAGES)),
        Relation("P176", "product", ("{} is produced by", "{} is a product of",
                                     "{} is created by", "{}, developed by"), tuple(companies)),
        Relation("P127", "organisation", ("{} is owned by", "{} is a subsidiary of",
                                          "The owner of {} is", "{}, owned by"),
                 tuple(companies)),
        Relation("P159", "organisation", ("{} is headquartered in", "{} is based in",
                                          "The headquarters of {} are in",
                                          "{}'s head office is in"), tuple(cities)),
    ]
    return {r.relation_id: r for r in rel}


SUBJECT_COUNTS = {"person": 300, "place": 210, "product": 260, "organisation": 130}
KIND_NOUNS = {"person": ["writer", "painter", "singer", "scientist", "actor", "politician"],
              "place": ["country", "region", "island", "province"],
              "product": ["device", "phone", "console", "camera"],
              "organisation": ["company", "firm", "publisher", "brand"]}


@lru_cache(maxsize=4)
def build_world(seed: int = DEFAULT_SEED) -> World:
    """The facts of the world: every subject gets one object for each relation of its kind.

    Popularity follows a Zipf-like law over a random ranking of all subjects, weight 1 / rank^0.8.
    """
    rng = random.Random(seed)
    taken: set[str] = set()
    relations = _relations(rng, taken)
    makers = {"person": _person, "place": _place, "product": _product,
              "organisation": _organisation}
    subjects = {kind: _unique_names(rng, n, makers[kind], taken)
                for kind, n in SUBJECT_COUNTS.items()}
    ranked = [s for names in subjects.values() for s in names]
    rng.shuffle(ranked)
    weight = {s: 1.0 / (rank + 1) ** 0.8 for rank, s in enumerate(ranked)}
    facts = [Fact(s, r.relation_id, rng.choice(r.objects), weight[s])
             for r in relations.values() for s in subjects[r.subject_kind]]
    objects = sorted({o for r in relations.values() for o in r.objects})
    object_ids = {o: f"S{i:04d}" for i, o in enumerate(objects)}
    return World(seed, relations, subjects, facts, object_ids)


# --- training corpus --------------------------------------------------------------------------

_FILLER_SUBJECTS = ["The old bridge", "A quiet market", "The northern road", "Every winter",
                    "The small harbour", "A long letter", "The city council", "An early train",
                    "The museum guide", "A heavy storm", "The village school", "Our neighbour"]
_FILLER_PREDICATES = ["was rebuilt last spring.", "opened before dawn.", "was closed for a week.",
                      "brought many visitors.", "changed very little.", "was mentioned again.",
                      "surprised everyone.", "lasted for hours.", "needed repairs.",
                      "was painted blue."]


def prefix_sentence(rng: random.Random) -> str:
    """An unrelated sentence, as CounterFact puts before its paraphrase prompts."""
    return f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_PREDICATES)}"


def mentions(fact: Fact, n_templates: int, min_mentions: int, max_mentions: int,
             top_weight: float) -> int:
    """How often a fact is stated per epoch: at least once per template, more for popular subjects."""
    extra = (max_mentions - min_mentions) * fact.weight / top_weight
    return max(min_mentions, n_templates, min_mentions + int(round(extra)))


def corpus(world: World, min_mentions: int = 4, max_mentions: int = 16,
           prefix_rate: float = 0.25) -> list[str]:
    """Training sentences: each fact under every template of its relation (cycling), some behind an
    unrelated prefix sentence, popular subjects more often; plus one "is a" sentence per subject."""
    rng = random.Random(world.seed + 1)
    top = max(f.weight for f in world.facts)
    sentences: list[str] = []
    for fact in world.facts:
        templates = world.relations[fact.relation_id].templates
        start = rng.randrange(len(templates))
        for j in range(mentions(fact, len(templates), min_mentions, max_mentions, top)):
            text = f"{templates[(start + j) % len(templates)].format(fact.subject)} {fact.obj}."
            if rng.random() < prefix_rate:
                text = f"{prefix_sentence(rng)} {text}"
            sentences.append(text)
    for kind, names in world.subjects.items():
        for s in names:
            sentences.append(f"{s} is a {rng.choice(KIND_NOUNS[kind])}.")
    rng.shuffle(sentences)
    return sentences


def load_corpus(name_or_path: str = WORLD_NAME, seed: int = DEFAULT_SEED) -> list[str]:
    """Texts for second-moment statistics: the synthetic corpus by name, or a local text file
    (one text per non-empty line) for real models."""
    if name_or_path == WORLD_NAME:
        return corpus(build_world(seed))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus {name_or_path!r}: not the synthetic world ({WORLD_NAME!r}) and no such file; "
            "for real models give a local text file with one text per line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- CounterFact records ----------------------------------------------------------------------

def counterfact_records(seed: int = DEFAULT_SEED, n_neighbours: int = 10,
                        n_attributes: int = 10) -> list[dict]:
    """One record in the full CounterFact schema for every fact of the world.

    The rewrite prompt is one template of the relation; the paraphrase prompts are two other
    templates behind an unrelated prefix sentence; the neighbourhood prompts are other subjects with
    the same relation and true object; the attribute prompts other subjects whose true object is
    the new target.
    """
    world = build_world(seed)
    rng = random.Random(seed + 2)
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
            "paraphrase_prompts": [f"{prefix_sentence(rng)} {t.format(fact.subject)}"
                                   for t in templates[1:3]],
            "neighborhood_prompts": prompts_for(neighbours, n_neighbours),
            "attribute_prompts": prompts_for(by_object.get((fact.relation_id, new), []),
                                             n_attributes),
            "generation_prompts": [f"{fact.subject} is known for",
                                   f"People say that {fact.subject}"],
        })
    return records


def relation_table(world: World) -> list[dict]:
    """One row per relation: what the world contains, for the book."""
    return [{"relation": r.relation_id, "subjects": r.subject_kind, "templates": len(r.templates),
             "example template": r.templates[0], "objects": len(r.objects),
             "facts": len(world.facts_of(r.relation_id))} for r in world.relations.values()]


def mention_counts(world: World, min_mentions: int = 4, max_mentions: int = 16) -> list[int]:
    """How often each fact is stated in one pass over the corpus (the Zipf-like skew)."""
    top = max(f.weight for f in world.facts)
    return [mentions(f, len(world.relations[f.relation_id].templates), min_mentions, max_mentions,
                     top) for f in world.facts]
