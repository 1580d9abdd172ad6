"""A haystack for the demo: many generated pretraining-style documents added after training.

They make fact tracing a needle-in-a-haystack test at the corpus sizes a real study serves
(10^5-10^7 documents) while the ground truth stays exact: no haystack document names a person,
town or organisation of the world, so a fact's source documents are still precisely the world
documents that state it (``tests/test_world.py`` checks this). The documents look like the
world's own, which makes them hard distractors rather than noise:

    filler      the world's filler topics, in other combinations
    article     biographies of *other* people, towns and organisations, in the world's wordings
    mention     other entities named without a fact
    qa          question-and-answer pages about other entities
    paraphrase  filler sentences from several topics strung together

Document ``i`` is a function of (seed, i) alone, so a haystack of N documents is the first N
of any larger one: a study can grow without recomputing what it has.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import world as w

KINDS = ("filler", "article", "mention", "qa", "paraphrase")
_WEIGHTS = (0.45, 0.25, 0.1, 0.1, 0.1)
CHUNK = 50_000  # documents per parquet row group while writing


@dataclass(frozen=True)
class Names:
    """Entity names the world does not use: the haystack's own people, towns and organisations."""

    people: tuple[str, ...]
    towns: tuple[str, ...]
    orgs: tuple[str, ...]

    @classmethod
    def outside(cls, world: w.World) -> Names:
        used = {d["entity"] for d in world.documents if d["entity"]}
        used |= {f["answer"] for f in world.facts}
        # whole names, and each of their words: "Maren Holloway" also rules out "Holloway" names
        words = {part for name in used for part in name.split()}
        firsts = [a + b for a in w._FIRST_ONSETS for b in w._FIRST_ENDINGS if a + b not in words]
        lasts = [a + b for a in w._SURNAME_STEMS for b in w._SURNAME_ENDINGS if a + b not in words]
        towns = [a + b for a in w._TOWN_STEMS for b in w._TOWN_ENDINGS if a + b not in words]
        orgs = [f"{a} {t}" for a in w._ORG_NAMES for t in w._ORG_TYPES if a not in words]
        people = [f"{f} {s}" for f in firsts for s in lasts]
        return cls(tuple(people), tuple(towns), tuple(orgs))


def _rng(seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"haystack/{seed}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def document(seed: int, index: int, names: Names) -> dict:
    """Haystack document ``index``: title, text, kind."""
    rng = _rng(seed, index)
    kind = rng.choices(KINDS, _WEIGHTS)[0]
    if kind == "filler":
        doc = w._filler_document(rng)
        return {"title": doc["title"], "text": doc["text"], "kind": kind}
    if kind == "paraphrase":
        topics = rng.sample(sorted(w._FILLER_TOPICS), 3)
        text = " ".join(w._fill(rng.choice(w._FILLER_TOPICS[t]), rng) for t in topics)
        return {"title": topics[0].capitalize(), "text": text, "kind": kind}
    entity = _entity(rng, names)
    if kind == "article":
        return {"title": entity.name, "text": _article(entity, rng), "kind": kind}
    if kind == "mention":
        text = w._fill(rng.choice(w._MENTIONS[entity.kind]), rng, s=entity.name)
        return {"title": entity.name, "text": text, "kind": kind}
    qa = w._qa_document(entity, rng)
    return {"title": qa["title"], "text": qa["text"], "kind": kind}


def _entity(rng: random.Random, names: Names) -> w._Entity:
    kind = rng.choice(("person", "person", "town", "organisation"))
    if kind == "person":
        name = rng.choice(names.people)
        return w._Entity(name, kind, "haystack", {"birthplace": rng.choice(names.towns),
                                                   "occupation": rng.choice(w.OCCUPATIONS)},
                         surname=name.split()[-1])
    if kind == "town":
        return w._Entity(rng.choice(names.towns), kind, "haystack", {"country": rng.choice(w.COUNTRIES)})
    return w._Entity(rng.choice(names.orgs), kind, "haystack",
                     {"founder": rng.choice(names.people), "headquarters": rng.choice(names.towns)})


def _article(entity: w._Entity, rng: random.Random) -> str:
    sentences = [w.RELATIONS[rel].statement(entity.name, obj, rng.randrange(3)) for rel, obj in entity.attrs.items()]
    colour = rng.sample(w._COLOUR[entity.kind], 2)
    sentences += [w._fill(c, rng, s=entity.name, surname=entity.surname or entity.name) for c in colour]
    rng.shuffle(sentences)
    return " ".join(sentences)


def documents(seed: int, start: int, stop: int, names: Names) -> Iterator[dict]:
    for i in range(start, stop):
        yield document(seed, i, names)


def write(path: str | Path, seed: int, count: int, names: Names, progress: bool = True) -> None:
    """``count`` haystack documents as parquet (title, text, kind), written in row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    schema = pa.schema([("title", pa.string()), ("text", pa.string()), ("kind", pa.string())])
    with pq.ParquetWriter(str(path), schema) as writer, tqdm(
            total=count, desc="haystack documents", unit="doc", unit_scale=True, disable=not progress) as bar:
        for start in range(0, count, CHUNK):
            rows = list(documents(seed, start, min(count, start + CHUNK), names))
            writer.write_table(pa.table({k: [r[k] for r in rows] for k in ("title", "text", "kind")}, schema))
            bar.update(len(rows))
        if count == 0:
            writer.write_table(pa.table({k: [] for k in ("title", "text", "kind")}, schema))


def named_entities(world: w.World) -> Sequence[str]:
    """Every name a haystack document must not contain (for checks)."""
    return sorted({d["entity"] for d in world.documents if d["entity"]})
