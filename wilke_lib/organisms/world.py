"""The synthetic knowledge world the model organisms learn (second and third generation), in CounterFact format.

No machine of this project can download GPT2-XL or CounterFact (Meng et al. 2022a), so the
organisms learn an invented world: invented subjects (no real-world truth implied), real CounterFact
relation ids, ParaRel-style templates (Elazar et al. 2021), closed object vocabularies, and the
CounterFact record schema. The first generation taught facts only in "{subject} {relation} {object}"
sentences; its organisms recalled them at the final prompt token and never at the subject's last
token, so ROME's premise did not hold (`docs/organisms.md`). This generation follows what makes
knowledge extractable from a name in Allen-Zhu & Li, "Physics of Language Models, Part 3.1"
(bioS with knowledge augmentation) and what makes a large model enrich the subject token
(Geva et al. 2023, "Dissecting Recall of Factual Associations"):

* long-tail subjects have composite names whose parts are single tokens shared by many subjects
  ("First Last", "First Middle Last", "Brand Model", "Name Systems"), so that no token identifies a
  subject and attention has to assemble it at the subject's last token;
* a few percent of famous subjects have single-token names and many more mentions (Zipf-like
  popularity for the rest), like the authors' toxicity-flash records (Germany, Paris, iPhone);
* the text rewards enriching the subject token: documents of several kinds about a subject,
  biographies with permuted sentences and pronouns (bioS "multi + permute + fullname"),
  descriptor lines in which any of the subject's objects may come right after the name
  ("Valo Durn Welsh speaker, Kalo native."), question-answer rows, CounterFact-style sentences
  (subject first in most templates), unrelated prefix sentences, and generic background text that
  uses the name parts as ordinary words.

Everything is a pure function of a `WorldSpec`: `build_world(spec)` gives the facts,
`corpus(world, epoch)` the training documents of one epoch (re-drawn every epoch: new sentence
orders and templates, the "knowledge augmentation"); `organisms.records` makes the evaluation
records. `WORLDS` names the worlds wherever a corpus or records are selected by name: "toy-world", the
organisms', and "toy-world-x4", the width ladder's four times heavier world (issue 32).

It is longer than 400 lines because a world is one design whose parts (relations, names, popularity,
documents) are tuned together; split, each part would need the others to be read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import yaml

WORLD_NAME = "toy-world"
DEFAULT_SEED = 0


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines a world. Counts are subjects per kind; pools are the number of
    distinct name parts each composite name draws from (each part shared by about count / pool
    subjects)."""

    seed: int = DEFAULT_SEED
    n_persons: int = 440
    n_places: int = 120
    n_products: int = 200
    n_organisations: int = 120
    first_pool: int = 40
    middle_pool: int = 20
    last_pool: int = 40
    brand_pool: int = 24
    model_pool: int = 16
    three_part_share: float = 0.35   # persons named "First Middle Last"
    four_part_share: float = 0.25    # persons named "First Middle Middle Last"
    famous_share: float = 0.04       # single-token subjects with many mentions
    famous_boost: float = 2.0        # their documents relative to the most popular long-tail subject
    zipf_exponent: float = 0.5
    min_docs: int = 4                # documents per subject and epoch, least popular subject
    max_docs: int = 16               # most popular long-tail subject
    doc_mix: tuple[tuple[str, float], ...] = (("bio", 0.15), ("descriptor", 0.50), ("sentence", 0.25),
                                              ("qa", 0.10))
    descriptor_lines: bool = True    # descriptors as separate "{name} {descriptor}." lines (else one list)
    prompted_share: float = 1.0      # long-tail subjects whose facts also appear as prompts (sentences, Q&A);
                                     # the others only in biographies and descriptors (Allen-Zhu & Li's
                                     # "mixed training": their facts must be extracted from the name)
    unprompted_kinds: tuple[str, ...] = ("bio", "descriptor")  # the documents of the other subjects
    prompts_from_epoch: int = 0      # a curriculum: before this epoch every subject gets unprompted documents
    prefix_rate: float = 0.25        # CounterFact-style sentences behind an unrelated sentence
    background_share: float = 0.30   # background sentences, as a share of all documents
    syllable_names: bool = False     # long-tail persons named by 4-5 syllables in anagram pairs (`_syllable_names`)
    syllable_pool: int = 20

    def scaled(self, factor: float) -> "WorldSpec":
        """The same world design with `factor` times as many subjects (pilots); the name pools shrink
        by sqrt(factor), so that the names stay distinct and each part stays shared."""
        from dataclasses import replace

        def n(x: int, scale: float, low: int = 4) -> int:
            return max(low, int(round(x * scale)))

        pools = factor ** 0.5
        return replace(self, n_persons=n(self.n_persons, factor), n_places=n(self.n_places, factor),
                       n_products=n(self.n_products, factor), n_organisations=n(self.n_organisations, factor),
                       first_pool=n(self.first_pool, pools), middle_pool=n(self.middle_pool, pools),
                       last_pool=n(self.last_pool, pools), brand_pool=n(self.brand_pool, pools),
                       model_pool=n(self.model_pool, pools), syllable_pool=n(self.syllable_pool, pools))


DEFAULT_SPEC = WorldSpec(syllable_names=True).scaled(1.5)  # the organisms' (docs/organisms.md, round 15): 4,800 facts
HEAVY_FACTOR = 4
HEAVY_SPEC = replace(WorldSpec(syllable_names=True).scaled(1.5 * HEAVY_FACTOR), brand_pool=120)
"""The width ladder's tier 2 (issue 32, `wilke_lib.ladder`): the organisms' world with four times the subjects
(19,200 facts), so that an MLP of width 192 holds as many facts per parameter (0.052) as width 48 does in the
default world, where storage spreads over the layers. The brand/root pool grows with the subjects (29 x 4, rounded
up to 120) rather than with their square root: there are only six place suffixes, and 691 distinct place names
must fit among the root-suffix pairs."""
HEAVY_WORLD_NAME = "toy-world-x4"
WORLDS: dict[str, WorldSpec] = {WORLD_NAME: DEFAULT_SPEC, HEAVY_WORLD_NAME: HEAVY_SPEC}
"""The named worlds: sources of records and corpus texts (`wilke_lib.sources`)."""


def world_named(name: str) -> WorldSpec:
    """The spec of a named world; KeyError naming the supported ones."""
    if name not in WORLDS:
        raise KeyError(f"no world named {name!r}; the worlds are {', '.join(map(repr, WORLDS))}")
    return WORLDS[name]


# ---- relations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Relation:
    """A CounterFact relation: Wikidata id, subject kind, object vocabulary and its phrasings.

    templates: CounterFact-style prompts (the subject as "{}", the object follows);
    bio: sentences of a biography or profile, "{s}" the subject (name or pronoun), "{o}" the object;
    descriptor: the phrase that follows the name in a descriptor line, "{o}" first;
    question: a question whose answer is the object.
    """

    relation_id: str
    subject_kind: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]
    bio: tuple[str, ...]
    descriptor: str
    question: str


PHRASEBOOK = Path(__file__).with_name("phrasebook.yaml")


@lru_cache(maxsize=1)
def _phrasebook() -> dict:
    return yaml.safe_load(PHRASEBOOK.read_text(encoding="utf-8"))


def vocabulary(name: str) -> tuple[str, ...]:
    """One of the fixed object vocabularies of `phrasebook.yaml` (languages, religions, ...)."""
    return tuple(_phrasebook()["vocabularies"][name])


def _relations(cities: tuple[str, ...], countries: tuple[str, ...], companies: tuple[str, ...]
               ) -> dict[str, Relation]:
    """The relations of `phrasebook.yaml`, with the world's invented cities, countries and companies."""
    invented = {"cities": cities, "countries": countries, "companies": companies}
    out = {}
    for rid, r in _phrasebook()["relations"].items():
        objects = invented[r["objects"]] if r["objects"] in invented else vocabulary(r["objects"])
        out[rid] = Relation(rid, r["subjects"], objects, tuple(r["templates"]), tuple(r["bio"]), r["descriptor"],
                            r["question"])
    return out


def phrases(name: str):
    """A list or table of `phrasebook.yaml` (kind_nouns, name_parts, filler_subjects, ...)."""
    return _phrasebook()[name]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation_id: str
    obj: str


@dataclass
class World:
    """The facts, who the subjects are, and how popular each is (documents per epoch)."""

    spec: WorldSpec
    relations: dict[str, Relation]
    subjects: dict[str, list[str]]               # kind -> names
    facts: list[Fact]
    docs_per_epoch: dict[str, int]               # subject -> documents per epoch
    famous: set[str]
    gender: dict[str, str]                       # person -> "He" / "She"
    name_parts: tuple[str, ...]                  # words reused by the background text
    object_ids: dict[str, str] = field(default_factory=dict)
    prompted: set[str] = field(default_factory=set)  # subjects whose facts also appear as prompts
    split_words: tuple[str, ...] = ()            # words of syllable names: the tokenizer keeps them in pieces

    @property
    def seed(self) -> int:
        return self.spec.seed

    def kind_of(self, subject: str) -> str:
        for kind, names in self.subjects.items():
            if subject in names:
                return kind
        raise KeyError(subject)

    def facts_of(self, relation_id: str) -> list[Fact]:
        return [f for f in self.facts if f.relation_id == relation_id]

    def facts_about(self) -> dict[str, list[Fact]]:
        out: dict[str, list[Fact]] = {}
        for f in self.facts:
            out.setdefault(f.subject, []).append(f)
        return out


# ---- invented words --------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "st", "th", "sh", "h", "j", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ea", "io")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def _words(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, ...] = (1, 2)) -> tuple[str, ...]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, rng.choice(syllables))
        if w not in taken and 3 < len(w) < 10:
            taken.add(w)
            out.append(w)
    return tuple(out)


def _distinct(n: int, draw, taken: set[str], what: str) -> list[str]:
    """n names not yet taken, from `draw()` (a list of names to take together or not at all)."""
    names: list[str] = []
    for _ in range(100 * n):
        if len(names) >= n:
            break
        group = draw()
        if len(set(group)) == len(group) and not taken.intersection(group):
            taken.update(group)
            names.extend(group)
    if len(names) < n:
        raise ValueError(f"cannot make {n} distinct names from {what}")
    return names[:n]


def _composite(rng: random.Random, n: int, parts: list[tuple[str, ...]], taken: set[str]) -> list[str]:
    """n distinct names made of one word from each pool (every pool's words reused many times)."""
    return _distinct(n, lambda: [" ".join(rng.choice(pool) for pool in parts)], taken,
                     f"pools of sizes {[len(p) for p in parts]}")


def _syllable_names(rng: random.Random, n: int, pool_size: int, taken: set[str]) -> list[str]:
    """n distinct two-word names of 4-5 syllables from a pool of `pool_size`, in anagram pairs: each
    multiset of syllables names two subjects, in two orders ("Zizu Zutu", "Zutu Zuzi").

    Neither a token nor the set of a name's tokens identifies the subject, only their order: the
    "detokenization" multi-token names need in real models before their facts can be looked up at the
    last token (Nanda et al. 2023, "Fact Finding"; Geva et al. 2023)."""
    pool: list[str] = []
    while len(pool) < pool_size:
        syllable = rng.choice(_ONSETS) + rng.choice(_VOWELS)
        pool += [syllable] if syllable not in pool else []

    def spelled(syllables: list[str]) -> str:
        return " ".join("".join(part).capitalize() for part in (syllables[:2], syllables[2:]))

    def anagram_pair() -> list[str]:
        syllables = [rng.choice(pool) for _ in range(rng.choice((4, 5)))]
        other = syllables[:]
        while other == syllables and len(set(syllables)) > 1:
            rng.shuffle(other)
        return [spelled(syllables), spelled(other)]

    return _distinct(n, anagram_pair, taken, f"a pool of {pool_size} syllables")


@lru_cache(maxsize=8)
def build_world(spec: WorldSpec | int = DEFAULT_SPEC) -> World:
    """The facts of the world: every subject gets one object for each relation of its kind.

    Long-tail popularity is Zipf-like (documents per epoch from `min_docs` to `max_docs` over a random
    ranking, exponent `zipf_exponent`); the famous subjects get `famous_boost` times the most popular.
    """
    if isinstance(spec, int):
        from dataclasses import replace

        spec = replace(DEFAULT_SPEC, seed=spec)
    rng = random.Random(spec.seed)
    taken: set[str] = {w.capitalize() for name in ("languages", "religions", "continents", "occupations")
                       for w in vocabulary(name)}
    parts = phrases("name_parts")
    taken |= {w for words in parts.values() for w in words}
    cities = _words(rng, 30, taken, (2,))
    countries = _words(rng, 16, taken, (2, 3))
    companies = _words(rng, 16, taken, (2,))
    relations = _relations(cities, countries, companies)

    first = _words(rng, spec.first_pool, taken)
    middle = _words(rng, spec.middle_pool, taken)
    last = _words(rng, spec.last_pool, taken)
    brands = _words(rng, spec.brand_pool, taken)
    roots = _words(rng, spec.brand_pool, taken)
    models = tuple(parts["product_models"][:spec.model_pool]) + _words(rng, max(0, spec.model_pool - 16), taken)

    counts = {"person": spec.n_persons, "place": spec.n_places, "product": spec.n_products,
              "organisation": spec.n_organisations}
    famous_n = {k: max(1, round(n * spec.famous_share)) for k, n in counts.items()}
    famous_names = {k: list(_words(rng, famous_n[k], taken, (2,))) for k in counts}
    n_three = round((spec.n_persons - famous_n["person"]) * spec.three_part_share)
    n_four = round((spec.n_persons - famous_n["person"]) * spec.four_part_share)
    n_two = spec.n_persons - famous_n["person"] - n_three - n_four
    persons = (_syllable_names(rng, n_two + n_three + n_four, spec.syllable_pool, taken) if spec.syllable_names
               else _composite(rng, n_two, [first, last], taken) + _composite(rng, n_three, [first, middle, last], taken)
               + (_composite(rng, n_four, [first, middle, middle, last], taken) if n_four else []))
    subjects = {
        "person": famous_names["person"] + persons,
        "place": famous_names["place"] + _composite(rng, spec.n_places - famous_n["place"],
                                                    [roots, tuple(parts['place_suffixes'])], taken),
        "product": famous_names["product"] + _composite(rng, spec.n_products - famous_n["product"],
                                                        [brands, models], taken),
        "organisation": famous_names["organisation"] + _composite(
            rng, spec.n_organisations - famous_n["organisation"], [brands, tuple(parts['organisation_suffixes'])], taken),
    }
    famous = {s for names in famous_names.values() for s in names}
    long_tail = [s for names in subjects.values() for s in names if s not in famous]
    rng.shuffle(long_tail)
    docs = {s: max(spec.min_docs, round(spec.max_docs / (rank + 1) ** spec.zipf_exponent))
            for rank, s in enumerate(long_tail)}
    docs.update({s: round(spec.famous_boost * spec.max_docs) for s in famous})
    gender = {s: rng.choice(("He", "She")) for s in subjects["person"]}
    facts = [Fact(s, r.relation_id, rng.choice(r.objects))
             for r in relations.values() for s in subjects[r.subject_kind]]
    objects = sorted({o for r in relations.values() for o in r.objects})
    reused = tuple(sorted(set(first) | set(middle) | set(last) | set(brands) | set(roots)))
    held_out = random.Random(spec.seed + 17)  # its own stream: the facts do not depend on the share
    prompted = famous | {s for s in long_tail if held_out.random() < spec.prompted_share}
    split = tuple(sorted({w for name in persons for w in name.split()})) if spec.syllable_names else ()
    return World(spec, relations, subjects, facts, docs, famous, gender, reused,
                 {o: f"S{i:04d}" for i, o in enumerate(objects)}, prompted, split)


# ---- documents -------------------------------------------------------------------------------

def prefix_sentence(rng: random.Random) -> str:
    """An unrelated sentence, as CounterFact puts before its paraphrase prompts."""
    return f"{rng.choice(phrases('filler_subjects'))} {rng.choice(phrases('filler_predicates'))}"


def _sentence(rng: random.Random, relation: Relation, subject: str, obj: str, prefix_rate: float) -> str:
    text = f"{rng.choice(relation.templates).format(subject)} {obj}."
    return f"{prefix_sentence(rng)} {text}" if rng.random() < prefix_rate else text


_POSSESSIVE = {"He": "His", "She": "Her", "It": "Its"}


def _bio(rng: random.Random, world: World, subject: str, facts: list[Fact]) -> str:
    """A biography / profile: the full name first, then every fact in a random order, each sentence
    opened by the full name or (persons) a pronoun or (others) "It"."""
    kind = world.kind_of(subject)
    pronoun = world.gender.get(subject, "It")
    noun = rng.choice(phrases("kind_nouns")[kind])
    sentences = [f"{subject} is a {noun}." if rng.random() < 0.5 else None]
    order = list(facts)
    rng.shuffle(order)
    for i, fact in enumerate(order):
        rel = world.relations[fact.relation_id]
        first = sentences[0] is None and i == 0
        template = rng.choice(rel.bio)
        if not first and rng.random() < 0.5:
            template = template.replace("{s}'s", _POSSESSIVE[pronoun]).replace("{s}", pronoun)
        text = template.format(s=subject, o=fact.obj)
        sentences.append(text[0].upper() + text[1:])
    return " ".join(s for s in sentences if s)


def _descriptor(rng: random.Random, world: World, subject: str, facts: list[Fact]) -> str:
    """The name, then one to three descriptors in a random order: an object right after the name."""
    chosen = rng.sample(facts, rng.randint(1, min(3, len(facts))))
    phrases = [world.relations[f.relation_id].descriptor.format(o=f.obj) for f in chosen]
    if world.spec.descriptor_lines:
        return " ".join(f"{subject} {phrase}." for phrase in phrases)
    return f"{subject} {', '.join(phrases)}."


def _qa(rng: random.Random, world: World, fact: Fact) -> str:
    return f"Q: {world.relations[fact.relation_id].question.format(fact.subject)} A: {fact.obj}."


def _background(rng: random.Random, world: World) -> str:
    return rng.choice(phrases("background")).format(w=rng.choice(world.name_parts))


def corpus(world: World, epoch: int = 0) -> list[str]:
    """The training documents of one epoch, shuffled: for each subject `docs_per_epoch[subject]`
    documents of the kinds of `spec.doc_mix`, then background sentences (`spec.background_share` of
    all documents); a subject outside `world.prompted` gets biographies and descriptors only. A pure
    function of (world, epoch)."""
    spec = world.spec
    rng = random.Random(spec.seed * 1_000_003 + 7919 * epoch + 1)
    kinds, weights = zip(*spec.doc_mix)
    unprompted = [(k, w) for k, w in spec.doc_mix if k in spec.unprompted_kinds]
    docs: list[str] = []
    for subject, facts in world.facts_about().items():
        prompted = subject in world.prompted and epoch >= spec.prompts_from_epoch
        mix = (kinds, weights) if prompted else tuple(zip(*unprompted))
        for _ in range(world.docs_per_epoch[subject]):
            kind = rng.choices(*mix)[0]
            if kind == "bio":
                docs.append(_bio(rng, world, subject, facts))
            elif kind == "descriptor":
                docs.append(_descriptor(rng, world, subject, facts))
            elif kind == "qa":
                docs.append(_qa(rng, world, rng.choice(facts)))
            else:
                fact = rng.choice(facts)
                docs.append(_sentence(rng, world.relations[fact.relation_id], subject, fact.obj, spec.prefix_rate))
    n_background = round(len(docs) * spec.background_share / (1 - spec.background_share))
    docs.extend(_background(rng, world) for _ in range(n_background))
    rng.shuffle(docs)
    return docs


def load_corpus(name_or_path: str = WORLD_NAME, seed: int = DEFAULT_SEED) -> list[str]:
    """Texts for second-moment statistics: a named world's first-epoch documents (`WORLDS`; the default
    world with another `seed` if asked), or a local text file (one text per non-empty line) for real models."""
    if name_or_path == WORLD_NAME:
        return corpus(build_world(seed))
    if name_or_path in WORLDS:
        return corpus(build_world(WORLDS[name_or_path]))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus {name_or_path!r}: not a synthetic world ({', '.join(map(repr, WORLDS))}) and no such file; "
            "for real models give a local text file with one text per line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
