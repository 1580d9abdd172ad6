"""Walkthrough: trace a fine-tuned model's answer back to the pretraining documents behind it.

Builds a tiny two-stage world in memory (under a minute on one CPU core, no downloads):

1. a generated encyclopedia about fictional people, with known facts stated in a few wordings;
2. a tiny GPT-NeoX pretrained on it, then fully fine-tuned on dolly-style instructions with the
   proximity term (alpha/2) * ||theta - theta_pt||^2 that links the two stages;
3. EK-FAC factors for both models;
4. for questions about people the fine-tuning data never mentions, the multi-stage influence of
   every pretraining document on the fine-tuned model's answer, with token heatmaps, beside the
   plain gradient dot product.

Run with ``make demo`` or ``python examples/walkthrough.py``.
"""

from __future__ import annotations

import copy
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from engine import (
    FactorArguments,
    Factors,
    LanguageModelingTask,
    ScoreArguments,
    TrackedLayer,
    attribute_tokens,
    encode_documents,
    encode_prompt_answer,
    find_tracked_layers,
    fit_factors,
    precondition,
    score_documents,
    sequence_gradients,
)

SEED = 0
MAX_LENGTH = 64
# Proximity strength of fine-tuning. Engine losses are sums over a sequence's tokens and the
# fine-tuning objective is mean_sequences(sum-loss) + (alpha/2)||theta - theta_pt||^2, so alpha
# lives on the scale of the fine-tuned Fisher's eigenvalues, and the same value enters
# (H_ft + alpha I)^-1 at query time.
ALPHA = 1e-3
LR_PT, LR_FT = 3e-3, 1e-3
FISHER_DRAWS = 8  # sampled-label passes per factor fit
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"

FIRST_NAMES = ["Orvel", "Maren", "Tobin", "Ysolde", "Cassik", "Leona", "Dravin", "Hesper", "Quill",
               "Ansel", "Brenna", "Corwin", "Elsbet", "Fenwick", "Galen", "Ilse", "Jorund", "Kestrel"]
SURNAMES = ["Tannick", "Holloway", "Vexley", "Arkwright", "Dunmore", "Pellam", "Rookwood", "Sarrow",
            "Thistle", "Umber", "Wexford", "Yarrow", "Blackmere", "Corrigan", "Esterby", "Faircloth",
            "Grimsby", "Harrowgate"]
CITIES = ["Brisk", "Valdmoor", "Quenhollow", "Tarrowick", "Ostrel", "Mirrendale", "Kelbridge", "Ashfen"]
JOBS = ["potter", "cartographer", "glassblower", "beekeeper", "shipwright", "stargazer", "weaver",
        "herbalist"]
RIVERS = ["Lanner", "Oska", "Pell", "Vire"]
GOODS = ["wool", "salt", "copper", "cider", "timber", "cheese", "lace", "ink"]
TOPICS = ["old maps", "river birds", "winter stars", "lost ships", "wild honey", "clay ovens"]
N_PRETRAINING_ONLY = 4  # people never mentioned in fine-tuning; the queries ask about them


# ----------------------------------------------------------------------------- the world

@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    in_finetuning: bool


@dataclass(frozen=True)
class Document:
    text: str
    kind: str  # "birth fact", "other fact", "town" or "filler"
    about: str | None = None  # the person a fact document mentions

    def states_birthplace_of(self, person: Person) -> bool:
        return self.kind == "birth fact" and self.about == person.name


# Two wordings of the birthplace fact, both with the name first: an autoregressive model learns
# "name -> city" from text in that order (the "reversal curse" blocks "Born in X, name ...").
BIRTH_WORDINGS = [
    "{name} was born in {city} and worked as a {job} for most of a long life.",
    "{name}, a native of {city}, is remembered as a patient {job}.",
]
OTHER_WORDINGS = [  # mention the person but not the birthplace: hard negatives
    "{name} once wrote a short book about {topic}. The book was copied in many towns.",
    "Travellers often asked {name} the {job} for advice about {topic}.",
]
TOWN_WORDING = "{city} is a small town on the {river} river. It is known for its {good}."
FILLER_SENTENCES = [
    "The {season} rains came early that year.", "Farmers in the valley grow {crop} and {crop2}.",
    "A market is held every {day} in the square.", "The old bridge was repaired in the {season}.",
    "Children learn to read from a primer about {topic}.", "The road to the coast is long and dusty.",
    "Merchants trade {good} for {good2} at the harbour.", "Most houses are built of grey stone.",
    "In the {season} the hills turn green.", "The harbour freezes over in a hard winter.",
]
FILLER_WORDS = {
    "season": ["spring", "summer", "autumn", "winter"], "crop": ["barley", "oats", "turnips", "rye"],
    "crop2": ["beans", "flax", "apples", "hops"], "day": ["monday", "friday", "sunday"],
    "topic": TOPICS, "good": GOODS, "good2": ["grain", "furs", "glass", "spices"],
}


def make_people(rng: random.Random) -> list[Person]:
    firsts, lasts = rng.sample(FIRST_NAMES, len(FIRST_NAMES)), rng.sample(SURNAMES, len(SURNAMES))
    people = []
    for i, (first, last) in enumerate(zip(firsts, lasts)):
        # Cities and jobs repeat across people, so a town name alone does not identify a source.
        people.append(Person(f"{first} {last}", CITIES[i % len(CITIES)], rng.choice(JOBS),
                             in_finetuning=i >= N_PRETRAINING_ONLY))
    return people


def make_corpus(people: list[Person], rng: random.Random, n_filler: int = 90) -> list[Document]:
    docs = []
    for p in people:
        for wording in BIRTH_WORDINGS:
            docs.append(Document(wording.format(name=p.name, city=p.city, job=p.job), "birth fact", p.name))
        wording = rng.choice(OTHER_WORDINGS)
        docs.append(Document(wording.format(name=p.name, job=p.job, topic=rng.choice(TOPICS)),
                             "other fact", p.name))
    for city in CITIES:
        docs.append(Document(TOWN_WORDING.format(city=city, river=rng.choice(RIVERS),
                                                 good=rng.choice(GOODS)), "town"))
    for _ in range(n_filler):
        sentences = rng.sample(FILLER_SENTENCES, rng.randint(2, 3))
        text = " ".join(s.format(**{k: rng.choice(v) for k, v in FILLER_WORDS.items()}) for s in sentences)
        docs.append(Document(text, "filler"))
    rng.shuffle(docs)
    return docs


def birth_question(p: Person) -> str:
    return f"Where was {p.name} born?"


def make_instructions(people: list[Person]) -> list[tuple[str, str]]:
    """Dolly-style (instruction, response) records.

    Responses refer to the person as "They": a 2-layer model does not learn to copy an unseen name
    from the instruction, but it does learn to look the fact up, which is what the queries test.
    """
    records = []
    for p in people:
        if p.in_finetuning:
            records.append((birth_question(p), f"They were born in {p.city}."))
            records.append((f"What did {p.name} do for a living?", f"They worked as a {p.job}."))
    for city in CITIES[:4]:
        records.append((f"Describe the town of {city}.", f"{city} is a small town on a river."))
    return records


# ----------------------------------------------------------------------------- tokenizer and model

def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; newlines are kept as tokens so the instruction template survives."""
    split = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), behavior="removed", invert=True)
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate([PAD, EOS, UNK] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def tiny_neox(vocab_size: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(SEED)
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=MAX_LENGTH * 2, hidden_dropout=0.0,
                           attention_dropout=0.0, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


def packed_blocks(token_docs: list[list[int]], eos: int, rng: random.Random) -> torch.Tensor:
    """Shuffle documents, join them with EOS and cut fixed-length blocks (fresh each epoch)."""
    order = rng.sample(token_docs, len(token_docs))
    stream = [t for doc in order for t in doc + [eos]]
    n = len(stream) // MAX_LENGTH
    return torch.tensor(stream[: n * MAX_LENGTH]).view(n, MAX_LENGTH)


def linear_tail(opt, epochs: int, hold: float, floor: float):
    """Constant learning rate for the first ``hold`` fraction of epochs, then linear decay to ``floor``."""
    start = int(epochs * hold)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 1.0 if e < start else 1 - (1 - floor) * (e - start) / (epochs - start))


def pretrain(model, tok, docs: list[Document], epochs: int = 160, batch_size: int = 16) -> float:
    """Plain next-token training on the packed corpus; returns the final epoch's mean token loss."""
    rng = random.Random(SEED)
    token_docs = [tok(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    opt = torch.optim.Adam(model.parameters(), lr=LR_PT)
    # The facts are picked up late at a constant rate; the decay tail then settles the weights
    # near a minimum, which the influence function assumes theta_pt to be.
    schedule = linear_tail(opt, epochs, hold=0.75, floor=0.1)
    model.train()
    for _ in range(epochs):
        blocks, losses = packed_blocks(token_docs, tok.eos_token_id, rng), []
        for batch in blocks.split(batch_size):
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        schedule.step()
    model.eval()
    return sum(losses) / len(losses)


def instruction_batch(tok, records: list[tuple[str, str]]) -> dict:
    """Template prompt, response + EOS as the scored answer (loss on response tokens only)."""
    prompts = [TEMPLATE.format(instruction=i) for i, _ in records]
    return encode_prompt_answer(tok, prompts, [r + EOS for _, r in records], MAX_LENGTH)


def finetune(pt_model, tok, records, epochs: int = 30, batch_size: int = 8) -> tuple:
    """Full fine-tuning of a copy with the proximity term; the loss is the engine's own task loss."""
    model = copy.deepcopy(pt_model)
    anchor = [p.detach().clone() for p in pt_model.parameters()]
    task, rng = LanguageModelingTask(), random.Random(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR_FT)
    schedule = linear_tail(opt, epochs, hold=0.0, floor=0.0)  # end at (near) the regularised optimum
    model.train()
    for _ in range(epochs):
        shuffled, losses = rng.sample(records, len(records)), []
        for start in range(0, len(shuffled), batch_size):
            batch = instruction_batch(tok, shuffled[start:start + batch_size])
            nll = task.sequence_losses(model, batch).mean()  # mean over sequences of summed losses
            prox = sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor))
            loss = nll + ALPHA / 2 * prox
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(nll.item())
        schedule.step()
    model.eval()
    with torch.no_grad():
        drift = sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor)).sqrt().item()
    return model, sum(losses) / len(losses), drift


# ----------------------------------------------------------------------------- influence

def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def answer(model, tok, question: str) -> str:
    prompt = tok(TEMPLATE.format(instruction=question), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def pretty(text: str) -> str:
    """Undo the word-level tokenizer's spacing around punctuation, for display."""
    return re.sub(r" ([.,?!])", r"\1", text)


def source_ranks(scores: torch.Tensor, sources: set[int]) -> list[int]:
    """1-based ranks (highest score first) of the documents that state the fact."""
    order = scores.argsort(descending=True).tolist()
    return [r for r, i in enumerate(order, 1) if i in sources]


# ----------------------------------------------------------------------------- printing

COLOUR = sys.stdout.isatty() and "NO_COLOR" not in os.environ
GREENS = [194, 157, 120, 83, 46]  # xterm-256 backgrounds, light to strong
REDS = [224, 217, 210, 203, 196]


def heatmap(tokens: list[str], values: list[float], show: int = 4) -> str:
    """Tokens coloured by contribution (TTY) or with [values] on the most influential ones."""
    scale = max(abs(v) for v in values) or 1.0
    tokens = ["⏎" if t == "\n" else t for t in tokens]
    if COLOUR:
        parts = []
        for t, v in zip(tokens, values):
            level = min(4, int(abs(v) / scale * 5))
            if abs(v) / scale < 0.05:
                parts.append(t)
            else:
                bg = (GREENS if v > 0 else REDS)[level]
                parts.append(f"\x1b[48;5;{bg}m\x1b[30m{t}\x1b[0m")
        return " ".join(parts)
    top = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:show])
    return " ".join(f"{t}[{values[i]:+.2g}]" if i in top else t for i, t in enumerate(tokens))


def print_ranking(title: str, scores: torch.Tensor, docs: list[Document], sources: set[int],
                  n_top: int = 5, n_bottom: int = 3) -> None:
    order = scores.argsort(descending=True).tolist()

    def row(rank: int, i: int) -> None:
        mark = "*" if i in sources else " "
        text = docs[i].text if len(docs[i].text) <= 78 else docs[i].text[:75] + "..."
        print(f"    {mark} #{rank:<3d} {scores[i].item():+.3e}  doc {i:<3d} {text}")

    print(f"  {title}")
    for rank, i in enumerate(order[:n_top], 1):
        row(rank, i)
    if n_bottom:
        print("    opponents:")
        for k in range(n_bottom):
            row(len(order) - k, order[-1 - k])


def rule(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * max(4, 78 - len(title))}")


# ----------------------------------------------------------------------------- main

@dataclass
class Stages:
    """Both models with what scoring needs from each."""

    pt_model: GPTNeoXForCausalLM
    ft_model: GPTNeoXForCausalLM
    pt_layers: list[TrackedLayer]
    ft_layers: list[TrackedLayer]
    pt_factors: Factors | None = None
    ft_factors: Factors | None = None


def build_world(rng: random.Random) -> tuple[list[Person], list[Document], list[tuple[str, str]],
                                             PreTrainedTokenizerFast]:
    rule("1. A tiny world")
    people = make_people(rng)
    docs = make_corpus(people, rng)
    records = make_instructions(people)
    tok = build_tokenizer([d.text for d in docs] + [TEMPLATE.format(instruction=i) + r for i, r in records])
    kinds = {k: sum(d.kind == k for d in docs) for k in ("birth fact", "other fact", "town", "filler")}
    print(f"pretraining corpus: {len(docs)} documents {kinds}; vocabulary {len(tok)} words")
    print(f"fine-tuning set: {len(records)} dolly-style records about "
          f"{sum(p.in_finetuning for p in people)} of {len(people)} people")
    print(f"template: {TEMPLATE.format(instruction='<instruction>')!r} + response")
    return people, docs, records, tok


def train_stages(tok, docs, records) -> Stages:
    rule("2. Two training stages")
    pt_model = tiny_neox(len(tok))
    pt_loss, secs = timed(pretrain, pt_model, tok, docs)
    n_params = sum(p.numel() for p in pt_model.parameters())
    print(f"pretrained GPT-NeoX ({n_params / 1e3:.0f}k parameters): final token loss {pt_loss:.3f} "
          f"[{secs:.1f}s]")
    (ft_model, ft_nll, drift), secs = timed(finetune, pt_model, tok, records)
    print(f"fine-tuned a full copy with alpha = {ALPHA:g} (on summed per-sequence losses): "
          f"response loss {ft_nll:.3f}/sequence, ||theta_ft - theta_pt|| = {drift:.2f} [{secs:.1f}s]")
    return Stages(pt_model, ft_model, find_tracked_layers(pt_model), find_tracked_layers(ft_model))


def fit_stage_factors(stages: Stages, task, doc_batches, ft_batches) -> None:
    rule("3. EK-FAC factors")
    # The true Fisher samples labels from the model; on a corpus this small one draw per sequence
    # gives a noisy estimate, so each sequence gets several label draws.
    fargs = FactorArguments(strategy="ekfac", fisher="true", seed=SEED,
                            label_samples=FISHER_DRAWS, progress=False)
    stages.pt_factors, secs = timed(fit_factors, stages.pt_model, task, doc_batches,
                                    stages.pt_layers, fargs)
    print(f"pretrained: {len(stages.pt_layers)} layers, {stages.pt_factors.num_sequences} "
          f"documents x {FISHER_DRAWS} label draws [{secs:.1f}s]")
    stages.ft_factors, secs = timed(fit_factors, stages.ft_model, task, ft_batches,
                                    stages.ft_layers, fargs)
    print(f"fine-tuned: {stages.ft_factors.num_sequences} instruction records x "
          f"{FISHER_DRAWS} label draws, response tokens only [{secs:.1f}s]")


def document_heatmap(stages: Stages, task, tok, text: str, query) -> str:
    batch = encode_documents(tok, [text], MAX_LENGTH)
    attribution = attribute_tokens(stages.pt_model, task, batch, stages.pt_layers, query)
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    return heatmap(tokens, attribution.token_scores[0, 0].tolist())


def answer_heatmap(stages: Stages, task, tok, text: str, query_row: dict, args) -> tuple[str, float]:
    """Split the query loss per answer token (influence is linear in it) and score each part."""
    split, positions = task.split_targets(query_row)
    per_token = precondition(sequence_gradients(stages.ft_model, task, split, stages.ft_layers), args,
                             stages.pt_factors, stages.ft_factors)
    batch = encode_documents(tok, [text], MAX_LENGTH)
    shares = attribute_tokens(stages.pt_model, task, batch, stages.pt_layers, per_token).scores[:, 0]
    tokens = tok.convert_ids_to_tokens(query_row["input_ids"][0, positions[:, 1]].tolist())
    return heatmap(tokens, shares.tolist()), shares.sum().item()


def main() -> None:
    t_start = time.perf_counter()
    # Tiny matrices: extra threads cost more than they save, and one thread makes the numbers
    # independent of the machine's core count.
    torch.set_num_threads(1)
    task = LanguageModelingTask()
    people, docs, records, tok = build_world(random.Random(SEED))
    stages = train_stages(tok, docs, records)
    doc_batches = [encode_documents(tok, [d.text for d in c], MAX_LENGTH) for c in chunks(docs, 16)]
    fit_stage_factors(stages, task, doc_batches, [instruction_batch(tok, c) for c in chunks(records, 16)])

    rule("4. Queries about people seen only in pretraining")
    queried = [p for p in people if not p.in_finetuning][:3]
    questions = [birth_question(p) for p in queried]
    answers = [answer(stages.ft_model, tok, q) for q in questions]
    query_batch = encode_prompt_answer(tok, [TEMPLATE.format(instruction=q) for q in questions], answers,
                                       MAX_LENGTH)
    q_grads = sequence_gradients(stages.ft_model, task, query_batch, stages.ft_layers)
    # The alpha of fine-tuning is the one that enters (H_ft + alpha I)^-1.
    ms_args = ScoreArguments(method="multi-stage", alpha=ALPHA)
    ms_query = precondition(q_grads, ms_args, stages.pt_factors, stages.ft_factors)
    gd_query = precondition(q_grads, ScoreArguments(method="gradient-dot"))
    damping = list(ms_query.damping.values())
    print(f"multi-stage: alpha = {ALPHA:g}; pretraining damping lambda = {ms_args.damping_factor} x mean "
          f"eigenvalue per layer = {min(damping):.2e} .. {max(damping):.2e}")
    (ms_scores, gd_scores), secs = timed(lambda: [
        score_documents(stages.pt_model, task, doc_batches, stages.pt_layers, q, progress=False)
        for q in (ms_query, gd_query)])
    print(f"scored {len(docs)} documents x {len(questions)} queries x 2 methods [{secs:.1f}s]")
    print("score = change of log p(answer | prompt) when the document is upweighted (+ proponent, "
          "- opponent);\n* = the document states the queried fact (ground truth).")
    print("heatmaps: green raises, red lowers the answer's log-likelihood. A document position's value "
          "includes\nits loss on the *next* token, so a fact often lights up on the word just before it.")

    summary = []
    for qi, (person, question, ans) in enumerate(zip(queried, questions, answers)):
        sources = {i for i, d in enumerate(docs) if d.states_birthplace_of(person)}
        verdict = "correct" if person.city in ans.split() else f"WRONG (true: {person.city})"
        rule(f"Query {qi + 1}: {question}")
        print(f"  fine-tuned model answers: {pretty(ans)!r}  -> {verdict}")
        print_ranking("multi-stage (EK-FAC, both stages):", ms_scores[qi], docs, sources)
        print_ranking("gradient-dot (no Hessian), for comparison:", gd_scores[qi], docs, sources, n_bottom=0)
        top = int(ms_scores[qi].argmax())
        print(f"  document heatmap of the top proponent, doc {top}:")
        print("    " + document_heatmap(stages, task, tok, docs[top].text, ms_query.select([qi])))
        row = {k: v[qi:qi + 1] for k, v in query_batch.items()}
        line, total = answer_heatmap(stages, task, tok, docs[top].text, row, ms_args)
        print(f"  answer heatmap: doc {top}'s score split over answer tokens (sum {total:+.3e}):")
        print("    " + line)
        summary.append((person, source_ranks(ms_scores[qi], sources), source_ranks(gd_scores[qi], sources)))

    rule("Summary")
    print(f"rank of the first true source document among {len(docs)} (all sources' ranks): " + "; ".join(
        f"{p.name}: multi-stage {ms[0]} {ms} vs gradient-dot {gd[0]} {gd}" for p, ms, gd in summary))
    print(f"total runtime {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
