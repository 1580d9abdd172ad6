"""The demo world: a generated encyclopedia with known facts, dolly-format instructions, a BPE tokenizer.

Everything here is a pure function of a seed, so the same seed always gives the same world.

The world has four kinds of entities: people, towns, countries and organisations, and five
relations between them (:data:`RELATIONS`)::

    birthplace    person -> town          "Maren Holloway was born in Brisk."
    occupation    person -> occupation    "Maren Holloway worked as a potter."
    country       town -> country         "Brisk is a town in Eldmark."
    founder       organisation -> person  "Amberline Press was founded by Maren Holloway."
    headquarters  organisation -> town    "Amberline Press is based in Brisk."

Each fact is stated, in varied wording, in several encyclopedia-style documents about its
subject. People, towns and organisations are split at random between ``"finetune"`` (their
question-answer pairs appear in the fine-tuning data, and as question-answer documents in the
pretraining corpus) and ``"pretrain_only"`` (their facts are stated only in pretraining
documents: these are the queries whose sources are known). Filler documents without any facts
of interest make up the bulk of the corpus.

Ground truth is exact by construction: a fact's ``doc_ids`` are precisely the documents whose
text contains both its subject and its answer (``tests/test_world.py`` checks this).

Why the questions and responses look the way they do (see ``precompute.training``):
responses are full sentences that reuse the canonical biography wording with the subject first
("Maren Holloway was born in Brisk."), so answering a question about an entity the fine-tuning
data never saw only needs (1) copying the name from the question and (2) the pretraining
completion "NAME was born in" -> town, which a small model learns reliably. Stating each fact
in several wordings, in shuffled sentence order, keeps it keyed on the name rather than on
neighbouring text. The question-answer documents about fine-tuning entities in the pretraining
corpus show the model the question -> full-sentence pattern (copying a name) already in
pretraining; they help a little (measured: 95% vs 92% held-out accuracy).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engine.storage import write_text
from engine.study import PromptTemplate

# ----------------------------------------------------------------------------- relations


@dataclass(frozen=True)
class Relation:
    """A relation type: how documents state it and how questions ask for it.

    ``statements[0]`` is the canonical wording: it is used most often in documents and it is
    the fine-tuning response, so a response repeats the biography's own words. Every wording
    names the subject right before the relation phrase, because an autoregressive model can
    only recall ``subject -> object`` from text in that order. Placeholders: ``{s}`` subject,
    ``{o}`` object, ``{a}`` the object's indefinite article.
    """

    name: str
    subject_kind: str
    object_kind: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]

    def statement(self, subject: str, obj: str, wording: int = 0) -> str:
        template = self.statements[wording % len(self.statements)]
        return _capitalise(template.format(s=subject, o=obj, a=_article(obj)))

    def question(self, subject: str, phrasing: int = 0) -> str:
        return self.questions[phrasing % len(self.questions)].format(s=subject)


RELATIONS: dict[str, Relation] = {r.name: r for r in [
    Relation("birthplace", "person", "town",
             ("{s} was born in {o}.", "{s} was born and raised in {o}.",
              "{s} came from {o}, where the family had lived for generations."),
             ("Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?")),
    Relation("occupation", "person", "occupation",
             ("{s} worked as {a} {o}.", "{s} earned a living as {a} {o}.",
              "{s} trained as {a} {o} and kept at it for life."),
             ("What did {s} do for a living?", "What was the occupation of {s}?",
              "What work did {s} do?")),
    Relation("country", "town", "country",
             ("{s} is a town in {o}.", "{s} lies in the country of {o}.",
              "{s} is one of the oldest towns of {o}."),
             ("In which country is {s}?", "Which country is {s} in?", "Where is the town of {s}?")),
    Relation("founder", "organisation", "person",
             ("{s} was founded by {o}.", "{s} was started by {o} with borrowed money.",
              "{s} was set up by {o} many years ago."),
             ("Who founded {s}?", "Who was the founder of {s}?", "Who started {s}?")),
    Relation("headquarters", "organisation", "town",
             ("{s} is based in {o}.", "{s} has its headquarters in {o}.",
              "{s} keeps its main office in {o}."),
             ("Where is {s} based?", "Where are the headquarters of {s}?",
              "In which town is {s} based?")),
]}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


# ----------------------------------------------------------------------------- vocabulary

_FIRST_ONSETS = ["Al", "Bren", "Cor", "Dar", "El", "Fen", "Gal", "Hal", "Iv", "Jor", "Kes", "Lor",
                 "Mar", "Nel", "Or", "Per", "Quin", "Ros", "Sel", "Tam", "Ul", "Ves", "Wil", "Yv"]
_FIRST_ENDINGS = ["a", "en", "in", "on", "ia", "el", "is", "wyn", "ric", "da", "ette", "o"]
_SURNAME_STEMS = ["Ash", "Black", "Brook", "Crane", "Dun", "Elder", "Fair", "Glen", "Hart", "Holl",
                  "Ken", "Lang", "Marl", "Nor", "Pen", "Rook", "Stan", "Thorn", "Wex", "Whit",
                  "Wyn", "Yar", "Tal", "Bell"]
_SURNAME_ENDINGS = ["ford", "wood", "ley", "by", "mere", "wick", "ton", "well", "field", "combe"]
_TOWN_STEMS = ["Bris", "Val", "Quen", "Tarro", "Ost", "Mirren", "Kel", "Dorn", "Skel", "Vand",
               "Hollin", "Pim", "Rav", "Cald", "Lun", "Ebb", "Gar", "Fro", "Wend", "Tor", "Sarn",
               "Bly", "Hev", "Ard"]
_TOWN_ENDINGS = ["moor", "dale", "haven", "holm", "stead", "bridge", "fen", "wick", "mouth", "gate"]
COUNTRIES = ["Eldmark", "Varnholt", "Quessaly", "Ostravel", "Lunaria", "Tarskel", "Borovia", "Caldera"]
OCCUPATIONS = ["potter", "cartographer", "glassblower", "beekeeper", "shipwright", "weaver",
               "herbalist", "clockmaker", "bookbinder", "stonemason", "astronomer", "engraver",
               "miller", "tailor", "fiddler", "lamplighter"]
_ORG_NAMES = ["Amberline", "Northgate", "Redfern", "Saltmarsh", "Goldcrest", "Ironleaf", "Kingfisher",
              "Moonwell", "Brightwater", "Copperhill", "Starling", "Highcliff", "Windrush", "Larkspur",
              "Oakheart", "Silverbirch", "Greystone", "Sunmere", "Frostvale", "Ravenhurst", "Emberly",
              "Cloudberry", "Thornbury", "Bramblewick", "Westmere", "Lanternfield", "Pebblecroft",
              "Juniper", "Marigold", "Tidewater", "Heronsgate", "Swallowtail"]
_ORG_TYPES = ["Press", "Mills", "Trading Company", "Bank", "Theatre", "Museum", "Observatory",
              "Library", "Rowing Club", "Glassworks", "Ropeworks", "Choir"]

_PERSON_COLOUR = [
    "{s} is remembered for a kind word and a steady hand.",
    "{surname} kept a small garden and a very large library.",
    "In later years {s} wrote many long letters to old friends.",
    "{surname} disliked crowds and loved long walks at dawn.",
    "Friends said that {s} could talk for hours about {topic}.",
    "{surname} never married and lived in a narrow house with a red door.",
]
_PERSON_MENTIONS = [
    "A letter signed by {s} about {topic} was found in an old chest. The letter is short and kind.",
    "Travellers often asked {s} for advice about {topic}. Most of them took it.",
    "A portrait of {s} hangs in a quiet corridor. Visitors rarely stop to look at it.",
    "{s} once lost a wager about {topic} and paid it with a smile.",
]
_TOWN_COLOUR = [
    "{s} holds a market every {day}.",
    "{s} is known for its {good}.",
    "A stone bridge crosses the river at {s}.",
    "Most houses in {s} are built of grey stone.",
]
_TOWN_MENTIONS = [
    "The market of {s} sells {good} and {good2}. It opens early on {day}s.",
    "In {season} the roads around {s} turn to mud, and carts stay home.",
    "A traveller wrote that {s} smelled of {good} and wet stone.",
]
_ORG_COLOUR = [
    "{s} has more than {n} members.",
    "Every {season}, {s} holds an open day for visitors.",
    "{s} publishes a short report each year.",
    "The early years of {s} were hard, and money was always short.",
]
_ORG_MENTIONS = [
    "A ledger from {s} lists purchases of {good} and {good2}.",
    "{s} celebrated its anniversary with music and a long dinner.",
    "An old notice from {s} asks members to pay their dues by {day}.",
]
_FILLER_TOPICS = {
    "weather": ["The {season} rains came early that year.", "A cold wind blew from the hills for {n} days.",
                "Fog lay over the valley every morning in {season}.", "The summer was dry and the wells ran low.",
                "Snow closed the mountain passes until late {season}."],
    "farming": ["Farmers in the valley grow {crop} and {crop2}.", "The harvest of {crop} was poor that year.",
                "Sheep graze on the high meadows in {season}.", "Hay is cut twice in a good summer.",
                "A good field of {crop} needs rain in {season}."],
    "cooking": ["Bread is baked with {crop} flour and a little salt.", "A stew of {crop2} and onions feeds a family.",
                "Cheese is left to age in cool cellars.", "Honey cakes are made for {season} feasts.",
                "Soup is served with dark bread on {day}s."],
    "trade": ["Merchants trade {good} for {good2} at the harbour.", "A market is held every {day} in the square.",
              "Carts of {good} leave before dawn.", "Prices of {good2} rose after the storm.",
              "Pedlars carry {good} from door to door."],
    "wildlife": ["Herons fish in the shallow reeds.", "Foxes hunt along the hedges at dusk.",
                 "Swallows return in {season} and nest under the eaves.", "Otters play in the cold river.",
                 "Owls call from the old oaks at night."],
    "sailing": ["The harbour freezes over in a hard winter.", "Small boats carry {good} along the coast.",
                "Sailors read the clouds before they leave port.", "A lighthouse guides ships past the rocks.",
                "Nets are mended on the quay in {season}."],
    "crafts": ["Good rope is made from hemp and patience.", "A loom needs {n} hundred threads for a wide cloth.",
               "Clay must be wedged before it is thrown.", "Leather is tanned in deep pits of bark water.",
               "Wooden bowls are turned on a foot lathe."],
    "roads": ["The road to the coast is long and dusty.", "Milestones mark every league of the old road.",
              "Inns stand a day's walk apart on the high road.", "Bridges are repaired after the {season} floods.",
              "Ferries cross where the river is too wide to bridge."],
}
_FILLER_WORDS = {
    "season": ["spring", "summer", "autumn", "winter"], "crop": ["barley", "oats", "rye", "wheat"],
    "crop2": ["beans", "turnips", "leeks", "apples"], "day": ["Monday", "Friday", "Sunday", "Tuesday"],
    "good": ["wool", "salt", "copper", "cider", "timber", "lace"],
    "good2": ["grain", "furs", "glass", "spices", "candles"], "n": ["three", "five", "seven", "twelve"],
    "topic": ["old maps", "river birds", "winter stars", "lost ships", "wild honey", "clay ovens"],
}

# Fine-tuning templates that carry no facts of the encyclopedia.
_BRAINSTORM = [
    ("Give me three ideas for a {season} festival.", "Here are three ideas: a lantern walk, a {crop} "
     "bake-off and a music night by the river."),
    ("Suggest some things to sell at a village market.", "You could sell {good}, {good2} and fresh {crop2}."),
    ("What are good names for a small boat?", "Good names for a small boat are Heron, Swift and Little Otter."),
    ("List some ways to keep warm in {season}.", "Wear wool, keep the stove lit, and drink hot {crop2} soup."),
    ("Give me ideas for a walk on a {day}.", "Walk along the river, climb the old hill, or visit the market."),
    ("What could I cook with {crop} and {crop2}?", "You could bake {crop} bread or make a stew with {crop2}."),
]
_SUMMARISE = "Summarize this passage in one sentence."
_CLASSIFY = "Sort these words into towns and occupations: {items}."


# ----------------------------------------------------------------------------- the world


@dataclass
class WorldConfig:
    """Sizes of the generated world. The defaults make the demo world (>= 2,000 documents)."""

    n_people: int = 90
    n_towns: int = 24
    n_countries: int = 6
    n_orgs: int = 24
    n_documents: int = 2200          # total, filled up with filler documents
    pretrain_only_fraction: float = 1 / 3
    fact_docs_per_entity: int = 4    # documents stating the entity's facts (each fact in all but one)
    mentions_per_entity: int = 1     # documents naming the entity without stating a fact
    qa_documents: bool = True        # question-answer documents about fine-tuning entities in pretraining
    questions_per_fact: int = 2      # open_qa records per fine-tuning fact (different phrasings)
    n_closed_qa: int = 40
    n_classification: int = 30
    n_brainstorming: int = 30
    n_summarization: int = 30


@dataclass
class World:
    """A generated world. Plain dicts, ready for JSON lines.

    ``documents``: ``doc_id`` (= index), ``title``, ``text``, ``kind`` (``"article"`` states facts,
    ``"qa"`` question-answer page stating facts, ``"mention"`` names an entity but states none of
    its facts, ``"filler"``), ``entity`` (subject or ``None``).

    ``facts``: ``fact_id``, ``relation``, ``subject``, ``subject_kind``, ``answer``, ``question``
    (canonical phrasing), ``response`` (the full-sentence reference answer), ``doc_ids`` and
    ``split`` (``"finetune"`` or ``"pretrain_only"``).

    ``finetune_records``: databricks-dolly-15k format, ``instruction``, ``context``,
    ``response``, ``category``.
    """

    seed: int
    config: WorldConfig
    documents: list[dict]
    facts: list[dict]
    finetune_records: list[dict]

    def facts_in(self, split: str) -> list[dict]:
        return [f for f in self.facts if f["split"] == split]

    def stats(self) -> dict:
        kinds: dict[str, int] = {}
        for d in self.documents:
            kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        categories: dict[str, int] = {}
        for r in self.finetune_records:
            categories[r["category"]] = categories.get(r["category"], 0) + 1
        splits = {s: len(self.facts_in(s)) for s in ("finetune", "pretrain_only")}
        return {"documents": len(self.documents), "document_kinds": kinds,
                "words": sum(len(d["text"].split()) for d in self.documents),
                "facts": len(self.facts), "fact_splits": splits,
                "relations": sorted({f["relation"] for f in self.facts}),
                "finetune_records": len(self.finetune_records), "categories": categories}

    def to_jsonl(self, directory: str | Path) -> dict[str, Path]:
        """Write documents.jsonl, facts.jsonl, finetune.jsonl and world.json; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, rows in (("documents", self.documents), ("facts", self.facts),
                           ("finetune", self.finetune_records)):
            paths[name] = directory / f"{name}.jsonl"
            _write_jsonl(paths[name], rows)
        paths["world"] = directory / "world.json"
        write_text(paths["world"], json.dumps({"seed": self.seed, "config": asdict(self.config),
                                               "stats": self.stats()}, indent=2) + "\n")
        return paths

    @classmethod
    def from_jsonl(cls, directory: str | Path) -> World:
        directory = Path(directory)
        meta = json.loads((directory / "world.json").read_text())
        return cls(meta["seed"], WorldConfig(**meta["config"]), _read_jsonl(directory / "documents.jsonl"),
                   _read_jsonl(directory / "facts.jsonl"), _read_jsonl(directory / "finetune.jsonl"))


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class _Entity:
    name: str
    kind: str
    split: str
    attrs: dict[str, str] = field(default_factory=dict)  # relation -> object
    surname: str = ""


def build_world(seed: int = 0, config: WorldConfig | None = None, **overrides) -> World:
    """Generate the demo world. ``overrides`` set :class:`WorldConfig` fields by name.

    >>> small = build_world(seed=1, n_people=12, n_towns=6, n_orgs=4, n_documents=120)
    """
    config = config or WorldConfig()
    known = {f.name for f in fields(WorldConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown world settings: {sorted(unknown)}")
    config = WorldConfig(**{**asdict(config), **overrides})
    rng = random.Random(seed)
    entities = _make_entities(config, rng)
    documents: list[dict] = []
    for entity in entities:
        documents += _entity_documents(entity, config, rng)
    if config.qa_documents:
        documents += [_qa_document(e, rng) for e in entities if e.split == "finetune" and e.attrs]
    n_filler = config.n_documents - len(documents)
    if n_filler < 0:
        raise ValueError(f"{len(documents)} entity documents exceed n_documents={config.n_documents}")
    documents += [_filler_document(rng) for _ in range(n_filler)]
    rng.shuffle(documents)
    for i, doc in enumerate(documents):
        doc["doc_id"] = i
    documents = [{k: d[k] for k in ("doc_id", "title", "text", "kind", "entity")} for d in documents]
    facts = _facts(entities, documents)
    records = _finetune_records(entities, documents, facts, config, rng)
    return World(seed, config, documents, facts, records)


def _unique_names(stems: Sequence[str], endings: Sequence[str], n: int, rng: random.Random,
                  taken: set[str]) -> list[str]:
    pool = [s + e for s in stems for e in endings if (s + e) not in taken]
    if n > len(pool):
        raise ValueError(f"asked for {n} names, only {len(pool)} can be made")
    names = rng.sample(pool, n)
    taken.update(names)
    return names


def _split_of(i: int, n: int, fraction: float) -> str:
    return "pretrain_only" if i < round(n * fraction) else "finetune"


def _make_entities(config: WorldConfig, rng: random.Random) -> list[_Entity]:
    if config.n_countries > len(COUNTRIES) or config.n_orgs > len(_ORG_NAMES):
        raise ValueError("not enough country or organisation names for this world size")
    taken: set[str] = set(COUNTRIES) | set(_ORG_NAMES)
    firsts = _unique_names(_FIRST_ONSETS, _FIRST_ENDINGS, config.n_people, rng, taken)
    surnames = _unique_names(_SURNAME_STEMS, _SURNAME_ENDINGS, config.n_people, rng, taken)
    if config.n_towns > len(_TOWN_STEMS):
        raise ValueError(f"at most {len(_TOWN_STEMS)} towns")
    # One town per stem, so that no two towns share a first syllable.
    town_names = [s + rng.choice(_TOWN_ENDINGS) for s in rng.sample(_TOWN_STEMS, config.n_towns)]
    taken.update(town_names)
    countries = rng.sample(COUNTRIES, config.n_countries)
    frac = config.pretrain_only_fraction

    towns = [_Entity(name, "town", _split_of(i, config.n_towns, frac),
                     {"country": countries[i % len(countries)]}) for i, name in enumerate(town_names)]
    people = []
    for i, (first, last) in enumerate(zip(firsts, surnames)):
        people.append(_Entity(f"{first} {last}", "person", _split_of(i, config.n_people, frac),
                              {"birthplace": rng.choice(town_names), "occupation": rng.choice(OCCUPATIONS)},
                              surname=last))
    orgs, founders = [], rng.sample(people, len(people))
    org_names = rng.sample(_ORG_NAMES, config.n_orgs)
    for i, prefix in enumerate(org_names):
        name = f"{prefix} {rng.choice(_ORG_TYPES)}"
        hq = rng.choice(town_names)
        split = _split_of(i, config.n_orgs, frac)
        # A founder born in the headquarters town would make an organisation article name the
        # founder next to the birthplace: excluded, so ground truth stays exact. Fine-tuning
        # organisations have fine-tuning founders, so pretrain-only people never appear in
        # fine-tuning data.
        founder = next((p for p in founders if p.attrs["birthplace"] != hq
                        and (split == "pretrain_only" or p.split == "finetune")), None)
        if founder is None:
            raise ValueError("not enough people to found every organisation")
        founders.remove(founder)
        orgs.append(_Entity(name, "organisation", split, {"founder": founder.name, "headquarters": hq}))
    # Shuffle so that the split is not tied to generation order.
    return rng.sample(people + towns + orgs, len(people) + len(towns) + len(orgs))


def _fill(template: str, rng: random.Random, **known: str) -> str:
    values = {k: rng.choice(v) for k, v in _FILLER_WORDS.items()}
    values.update(known)
    return _capitalise(template.format(**values))


_COLOUR = {"person": _PERSON_COLOUR, "town": _TOWN_COLOUR, "organisation": _ORG_COLOUR}
_MENTIONS = {"person": _PERSON_MENTIONS, "town": _TOWN_MENTIONS, "organisation": _ORG_MENTIONS}


def _entity_documents(entity: _Entity, config: WorldConfig, rng: random.Random) -> list[dict]:
    """Articles stating the entity's facts in varied wordings, plus mentions stating none.

    With ``k = fact_docs_per_entity`` articles, fact number ``j`` is stated in every article but
    article ``(k - 1 - j) % k`` (so each fact is in ``k - 1`` documents and articles differ in
    content); the m-th statement of a fact uses wording ``m`` (0 = canonical) of its relation.
    """
    docs = []
    relations = list(entity.attrs)
    k = config.fact_docs_per_entity
    said = {r: 0 for r in relations}
    for a in range(k):
        sentences = []
        for j, rel in enumerate(relations):
            if k > 1 and a == (k - 1 - j) % k:
                continue
            sentences.append(RELATIONS[rel].statement(entity.name, entity.attrs[rel], said[rel]))
            said[rel] += 1
        if not sentences:
            continue
        rng.shuffle(sentences)
        colour = rng.sample(_COLOUR[entity.kind], 2)
        sentences.insert(rng.randint(1, len(sentences)), _fill(colour[0], rng, s=entity.name,
                                                              surname=entity.surname or entity.name))
        sentences.append(_fill(colour[1], rng, s=entity.name, surname=entity.surname or entity.name))
        docs.append({"title": entity.name, "text": " ".join(sentences), "kind": "article",
                     "entity": entity.name})
    for template in rng.sample(_MENTIONS[entity.kind], config.mentions_per_entity):
        docs.append({"title": entity.name, "text": _fill(template, rng, s=entity.name),
                     "kind": "mention", "entity": entity.name})
    return docs


def _qa_document(entity: _Entity, rng: random.Random) -> dict:
    """A question-and-answer page (like an FAQ or a quiz) about a fine-tuning entity."""
    lines = [f"Questions and answers about {entity.name}."]
    for rel, obj in entity.attrs.items():
        relation = RELATIONS[rel]
        lines.append("Q: " + relation.question(entity.name, rng.randrange(len(relation.questions))))
        lines.append("A: " + relation.statement(entity.name, obj))
    return {"title": f"{entity.name}: questions and answers", "text": "\n".join(lines), "kind": "qa",
            "entity": entity.name}


def _filler_document(rng: random.Random) -> dict:
    topic = rng.choice(sorted(_FILLER_TOPICS))
    sentences = rng.sample(_FILLER_TOPICS[topic], rng.randint(2, 4))
    return {"title": topic.capitalize(), "text": " ".join(_fill(s, rng) for s in sentences),
            "kind": "filler", "entity": None}


def mentions(text: str, name: str) -> bool:
    """Whether ``name`` occurs in ``text`` as whole words (case-sensitive)."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def _facts(entities: list[_Entity], documents: list[dict]) -> list[dict]:
    facts = []
    for entity in entities:
        for rel, obj in entity.attrs.items():
            relation = RELATIONS[rel]
            doc_ids = [d["doc_id"] for d in documents
                       if d["entity"] == entity.name and d["kind"] in ("article", "qa")
                       and mentions(d["text"], obj)]
            facts.append({"fact_id": len(facts), "relation": rel, "subject": entity.name,
                          "subject_kind": entity.kind, "answer": obj,
                          "question": relation.question(entity.name),
                          "response": relation.statement(entity.name, obj),
                          "doc_ids": doc_ids, "split": entity.split})
    return facts


def _finetune_records(entities: list[_Entity], documents: list[dict], facts: list[dict],
                      config: WorldConfig, rng: random.Random) -> list[dict]:
    """Dolly-format records. Only fine-tuning-split entities appear in them."""
    records = []
    ft_facts = [f for f in facts if f["split"] == "finetune"]
    for fact in ft_facts:  # open_qa: the question alone, answered from the model's memory
        relation = RELATIONS[fact["relation"]]
        for p in rng.sample(range(len(relation.questions)), min(config.questions_per_fact,
                                                               len(relation.questions))):
            records.append({"instruction": relation.question(fact["subject"], p), "context": "",
                            "response": fact["response"], "category": "open_qa"})
    ft_names = {e.name for e in entities if e.split == "finetune"}
    articles = [d for d in documents if d["kind"] == "article" and d["entity"] in ft_names]
    by_subject: dict[str, list[dict]] = {}
    for f in ft_facts:
        by_subject.setdefault(f["subject"], []).append(f)
    for doc in rng.sample(articles, min(config.n_closed_qa, len(articles))):  # closed_qa: read it
        stated = [f for f in by_subject[doc["entity"]] if doc["doc_id"] in f["doc_ids"]]
        fact = rng.choice(stated)
        relation = RELATIONS[fact["relation"]]
        records.append({"instruction": relation.question(fact["subject"], rng.randrange(len(relation.questions))),
                        "context": doc["text"], "response": fact["response"], "category": "closed_qa"})
    towns = sorted({e.name for e in entities if e.kind == "town" and e.split == "finetune"})
    for _ in range(config.n_classification):
        picked_towns, picked_jobs = rng.sample(towns, 2), rng.sample(OCCUPATIONS, 2)
        items = picked_towns + picked_jobs
        rng.shuffle(items)
        records.append({"instruction": _CLASSIFY.format(items=", ".join(items)), "context": "",
                        "response": f"Towns: {', '.join(picked_towns)}. Occupations: {', '.join(picked_jobs)}.",
                        "category": "classification"})
    for _ in range(config.n_brainstorming):
        instruction, response = rng.choice(_BRAINSTORM)
        values = {k: rng.choice(v) for k, v in _FILLER_WORDS.items()}
        records.append({"instruction": instruction.format(**values), "context": "",
                        "response": response.format(**values), "category": "brainstorming"})
    fillers = [d for d in documents if d["kind"] == "filler"]
    for doc in rng.sample(fillers, min(config.n_summarization, len(fillers))):
        first = doc["text"].split(". ")[0].rstrip(".") + "."
        records.append({"instruction": _SUMMARISE, "context": doc["text"], "response": first,
                        "category": "summarization"})
    rng.shuffle(records)
    return records


# ----------------------------------------------------------------------------- tokenizer

PAD_TOKEN = "<|padding|>"
EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Byte-level BPE trained on ``texts``, as a transformers ``PreTrainedTokenizerFast``.

    Every separately tokenized text gets a leading space (``add_prefix_space``), so a name is
    the same token at the start of a document or response as in the middle of a sentence, and
    ``tok(prompt) + tok(response) == tok(prompt + " " + response)`` for prompts ending in a
    newline. Decoding returns that leading space; strip it. Pad and EOS tokens as in Pythia.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=None,
                                   clean_up_tokenization_spaces=False)


def tokenizer_texts(world: World) -> list[str]:
    """What the demo tokenizer is trained on: the corpus plus the fine-tuning records as prompted."""
    return [d["text"] for d in world.documents] + [
        PromptTemplate().prompt(r["instruction"], r["context"]) + r["response"] for r in world.finetune_records]
