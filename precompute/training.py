"""The demo's two training stages, and how well the fine-tuned model answers.

1. :func:`pretrain`: next-token training of a small GPT-NeoX on the corpus. Documents are
   shuffled and re-packed into fixed-length sequences every epoch (EOS between documents).
   Packing the same documents into the same sequences every epoch lets the model memorise
   neighbouring text instead of ``name -> fact`` (measured: 25% vs 93% name-keyed recall).
2. :func:`finetune`: full fine-tuning of a copy on dolly-format records, loss on response
   tokens only, plus the proximity term ``(alpha_train/2) ||theta - theta_pt||^2`` that links
   the stages in the multi-stage influence function.

Loss scale and the engine's ``alpha``: the engine's losses are *sums* over a sequence's scored
tokens and its Fisher is that of the *mean over sequences*. Fine-tuning here minimises, per
batch, ``loss_ft + (alpha_train/2) ||theta - theta_pt||^2`` with ``loss_ft`` either

* ``"token_mean"`` (default, as Hugging Face's Trainer and dolly's own training): mean over the
  batch's response tokens. Multiplying the objective by the mean number of scored tokens per
  record ``T`` gives the engine's form, so ``alpha_engine = alpha_train * T`` (exact when every
  batch has the same token count, an approximation otherwise), or
* ``"sequence_sum"``: mean over records of summed response losses: ``alpha_engine = alpha_train``.

Both values are in the returned report; the engine's ``ScoreArguments(alpha=...)`` takes
``alpha_engine``.

The defaults are the demo recipe, measured on the default world (``build_world(0)``: 2,200
documents, 252 facts, 84 pretrain-only): ``demo_model_config`` (GPT-NeoX, 4 layers x 128,
1.28M parameters with the 1.9k-token BPE), 25 pretraining epochs and 10 fine-tuning epochs with
``alpha_train = 1e-2`` (``alpha_engine`` ~ 0.09) take about 9 + 2.5 minutes at one thread on this
project's 2-core AMD EPYC (a pretraining step of 16 x 128 tokens is ~0.6 s: ~30 GFLOPS per core at
these matrix sizes, near its peak), and the fine-tuned model answers 100% of the
pretrain-only questions with the right answer (97.6% word for word). What matters, in
order: full-sentence responses reusing the documents' canonical wording, enough pretraining
epochs (15: 83%, 25: 95-99%), re-packing, and a proximity term that is not too weak
(``alpha_train`` 1e-3: 95%, 1e-2: 100%). On a busy machine use ``threads=1``: two threads
sharing a core with another process ran pretraining 4x slower than one.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from engine.study import DOLLY_INTRO, PromptTemplate
from engine.tasks import IGNORE, LanguageModelingTask

from .world import RELATIONS, mentions

# ----------------------------------------------------------------------------- model and configs


def demo_model_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 4,
                      num_heads: int = 4, intermediate_size: int | None = None,
                      max_position_embeddings: int = 512) -> GPTNeoXConfig:
    """A small GPT-NeoX (no dropout, untied LM head: the engine refuses tied weights)."""
    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
                         max_position_embeddings=max_position_embeddings, hidden_dropout=0.0,
                         attention_dropout=0.0, tie_word_embeddings=False, use_cache=True)


@dataclass
class PretrainConfig:
    """Pretraining hyperparameters.

    The learning rate warms up linearly for ``warmup_steps``, stays constant until ``hold`` of
    the run, then decays linearly to ``final_lr_fraction`` of ``lr``: facts are picked up late
    at a high constant rate, and the tail settles the weights near a minimum, which the
    influence function assumes ``theta_pt`` to be. Training is deterministic for a given seed
    and thread count (float reductions differ between thread counts).
    """

    epochs: int = 25
    batch_size: int = 16
    block_size: int = 128           # packed sequence length (tokens)
    packing: bool = True            # False: one document per sequence, length-bucketed batches
    lr: float = 3e-3
    warmup_steps: int = 100
    hold: float = 0.6
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    threads: int | None = None      # torch intra-op threads during training (None: leave as is)


@dataclass
class FinetuneConfig:
    """Fine-tuning hyperparameters (see the module docstring for ``alpha`` and ``loss``)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    alpha: float = 1e-2             # proximity strength on the training loss's scale
    loss: str = "token_mean"        # or "sequence_sum"
    max_length: int = 256
    intro: str = DOLLY_INTRO        # the template's blurb line ("" leaves it out)
    max_grad_norm: float = 1.0
    seed: int = 0
    threads: int | None = None


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _schedule(opt, total_steps: int, warmup: int, hold: float, floor: float):
    """Linear warm-up, constant until ``hold`` of the steps, then linear decay to ``floor``."""
    start = max(int(total_steps * hold), warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - start) / max(1, total_steps - start))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- pretraining


def _doc_text(doc) -> str:
    return doc["text"] if isinstance(doc, dict) else str(doc)


def _packed_batches(token_docs: list[list[int]], eos: int, cfg: PretrainConfig,
                    rng: random.Random) -> list[dict]:
    """Shuffle the documents, join them with EOS, cut ``block_size`` blocks, batch them.

    Called every epoch, so documents land in new neighbours and at new offsets each time. The
    tail that does not fill a whole block is dropped (a different one every epoch).
    """
    order = rng.sample(range(len(token_docs)), len(token_docs))
    stream = [t for i in order for t in token_docs[i] + [eos]]
    n = len(stream) // cfg.block_size
    blocks = torch.tensor(stream[: n * cfg.block_size]).view(n, cfg.block_size)
    return [{"input_ids": b, "labels": b} for b in blocks.split(cfg.batch_size)]


def _unpacked_batches(token_docs: list[list[int]], eos: int, pad: int, cfg: PretrainConfig,
                      rng: random.Random) -> list[dict]:
    """One document (+ EOS) per row; rows of similar length batched together, batches shuffled."""
    order = rng.sample(range(len(token_docs)), len(token_docs))
    chunk = cfg.batch_size * 32  # sort within chunks: little padding, still random batches
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: len(token_docs[i]))
        for b in range(0, len(group), cfg.batch_size):
            rows = [token_docs[i][: cfg.block_size - 1] + [eos] for i in group[b:b + cfg.batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad)
            labels = torch.full((len(rows), width), IGNORE)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = labels[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    rng.shuffle(batches)
    return batches


def _steps_per_epoch(token_docs: list[list[int]], cfg: PretrainConfig) -> int:
    if cfg.packing:
        blocks = sum(len(t) + 1 for t in token_docs) // cfg.block_size
        return math.ceil(blocks / cfg.batch_size)
    chunk = cfg.batch_size * 32  # as in _unpacked_batches
    return sum(math.ceil(min(chunk, len(token_docs) - s) / cfg.batch_size)
               for s in range(0, len(token_docs), chunk))


def pretrain(model_config: GPTNeoXConfig, tokenizer, documents: Sequence[dict | str],
             cfg: PretrainConfig | None = None, progress: bool = True
             ) -> tuple[GPTNeoXForCausalLM, dict]:
    """Train a fresh GPT-NeoX on ``documents`` (dicts with ``text``, or strings).

    Returns the model (in eval mode) and a report: hyperparameters, model size, tokens per
    epoch, mean token loss per epoch, steps, wall time and threads.
    """
    cfg = cfg or PretrainConfig()
    start = time.perf_counter()
    with _threads(cfg.threads) as threads:
        torch.manual_seed(cfg.seed)
        model = GPTNeoXForCausalLM(model_config)
        rng = random.Random(cfg.seed)
        token_docs = [tokenizer(_doc_text(d), add_special_tokens=False)["input_ids"] for d in documents]
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

        def epoch_batches():
            if cfg.packing:
                return _packed_batches(token_docs, eos, cfg, rng)
            return _unpacked_batches(token_docs, eos, pad, cfg, rng)

        total = _steps_per_epoch(token_docs, cfg) * cfg.epochs
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = _schedule(opt, total, cfg.warmup_steps, cfg.hold, cfg.final_lr_fraction)
        model.train()
        epoch_losses, steps = [], 0
        bar = tqdm(range(cfg.epochs), desc="pretraining", unit="epoch", disable=not progress)
        for _ in bar:
            loss_sum, tok_sum = 0.0, 0
            for batch in epoch_batches():
                steps += 1
                loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                loss_sum += loss.item() * n
                tok_sum += n
            epoch_losses.append(loss_sum / tok_sum)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
        model.eval()
    report = {
        "config": asdict(cfg), "model": model_config.to_diff_dict(), "n_parameters": _n_params(model),
        "documents": len(token_docs), "tokens_per_epoch": sum(len(t) + 1 for t in token_docs),
        "steps": steps, "planned_steps": total, "epoch_losses": epoch_losses,
        "final_loss": epoch_losses[-1] if epoch_losses else None,
        "wall_time_s": time.perf_counter() - start, "threads": threads,
    }
    return model, report


# ----------------------------------------------------------------------------- fine-tuning


def prompt_template(tokenizer, intro: str = DOLLY_INTRO) -> PromptTemplate:
    """The demo's template: dolly-v2's with ``intro``, EOS ending every response."""
    return PromptTemplate.dolly(intro, response_suffix=tokenizer.eos_token)


def instruction_batch(tokenizer, records: Sequence[dict], max_length: int = 256,
                      intro: str = DOLLY_INTRO) -> dict[str, torch.Tensor]:
    """Prompted dolly records; the response + EOS are the scored tokens (labels), the prompt is not."""
    template = prompt_template(tokenizer, intro)
    return next(template.record_batches(tokenizer, records, max_length, batch_size=len(records)))


def _record_batches(records: Sequence[dict], tokenizer, cfg: FinetuneConfig,
                    rng: random.Random) -> Iterator[dict]:
    order = rng.sample(range(len(records)), len(records))
    yield from prompt_template(tokenizer, cfg.intro).record_batches(
        tokenizer, [records[i] for i in order], cfg.max_length, cfg.batch_size)


def finetune(pt_model: GPTNeoXForCausalLM, tokenizer, records: Sequence[dict],
             cfg: FinetuneConfig | None = None, progress: bool = True
             ) -> tuple[GPTNeoXForCausalLM, dict]:
    """Fully fine-tune a copy of ``pt_model`` on dolly records with the proximity term.

    Returns the fine-tuned model (eval mode) and a report with the hyperparameters, per-epoch
    response loss, the scored tokens per record, ``alpha_train`` and ``alpha_engine`` (see the
    module docstring), the final proximity ``||theta_ft - theta_pt||``, wall time and threads.
    """
    cfg = cfg or FinetuneConfig()
    if cfg.loss not in ("token_mean", "sequence_sum"):
        raise ValueError(f"loss must be 'token_mean' or 'sequence_sum', not {cfg.loss!r}")
    start = time.perf_counter()
    task = LanguageModelingTask()
    with _threads(cfg.threads) as threads:
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(pt_model)
        anchor = [p.detach().clone() for p in pt_model.parameters()]
        full = instruction_batch(tokenizer, records, cfg.max_length, cfg.intro)
        tokens_per_record = (full["labels"][:, 1:] != IGNORE).sum(dim=1).double().mean().item()
        steps_per_epoch = math.ceil(len(records) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = _schedule(opt, total, cfg.warmup_steps, hold=0.0, floor=0.0)  # decay to the optimum
        rng = random.Random(cfg.seed)
        model.train()
        epoch_losses = []
        bar = tqdm(range(cfg.epochs), desc="fine-tuning", unit="epoch", disable=not progress)
        for _ in bar:
            seq_sum, n_seq = 0.0, 0
            for batch in _record_batches(records, tokenizer, cfg, rng):
                token_losses = task.token_losses(model, batch)
                if cfg.loss == "token_mean":
                    loss = token_losses.sum() / (batch["labels"][:, 1:] != IGNORE).sum()
                else:
                    loss = token_losses.sum(dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():  # gradient of (alpha/2)||theta - theta_pt||^2
                    for p, a in zip(model.parameters(), anchor):
                        p.grad.add_(p - a, alpha=cfg.alpha)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                seq_sum += token_losses.sum().item()
                n_seq += token_losses.shape[0]
            epoch_losses.append(seq_sum / n_seq)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
        model.eval()
        with torch.no_grad():
            drift = math.sqrt(sum((p - a).square().sum().item() for p, a in zip(model.parameters(), anchor)))
    alpha_engine = cfg.alpha * tokens_per_record if cfg.loss == "token_mean" else cfg.alpha
    report = {
        "config": asdict(cfg), "records": len(records), "steps": total,
        "response_tokens_per_record": tokens_per_record,
        "epoch_losses_per_record": epoch_losses,  # summed response loss per record (engine scale)
        "alpha_train": cfg.alpha, "alpha_engine": alpha_engine,
        "alpha_note": ("engine scale = losses summed over a record's response tokens (incl. EOS), "
                       "Fisher of the mean over records; alpha_engine = alpha_train * "
                       f"{'mean response tokens per record' if cfg.loss == 'token_mean' else '1'}"),
        "drift_norm": drift, "wall_time_s": time.perf_counter() - start, "threads": threads,
    }
    return model, report


# ----------------------------------------------------------------------------- answering


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
             batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at EOS, stripped."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out


def answer(model, tokenizer, question: str, context: str = "", max_new_tokens: int = 32,
           intro: str = DOLLY_INTRO) -> str:
    """The model's greedy response to one instruction in the dolly template."""
    return generate(model, tokenizer, [PromptTemplate.dolly(intro).prompt(question, context)], max_new_tokens)[0]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _candidates(facts: Sequence[dict]) -> dict[str, set[str]]:
    """All answers of each relation, from the facts and the relation's object vocabulary."""
    values: dict[str, set[str]] = {}
    for f in facts:
        values.setdefault(f["relation"], set()).add(f["answer"])
    return values


def score_response(fact: dict, response: str, candidates: set[str]) -> dict:
    """Grade one response.

    ``contains_answer``: the answer occurs in the response as whole words and no *other* answer
    of the same relation does (so listing every town does not count). ``strict``: the response
    equals the reference full sentence ``fact["response"]`` (whitespace-normalised).
    """
    others = [c for c in candidates if c != fact["answer"] and not mentions(fact["answer"], c)]
    contains = mentions(response, fact["answer"]) and not any(mentions(response, c) for c in others)
    return {"contains_answer": contains, "strict": _normalise(response) == _normalise(fact["response"])}


def exact_match_accuracy(model, tokenizer, facts: Sequence[dict], split: str | None = "pretrain_only",
                         max_new_tokens: int = 32, intro: str = DOLLY_INTRO, all_facts: Sequence[dict] | None = None
                         ) -> dict:
    """Ask every fact's ``question`` (greedy, dolly template) and grade with :func:`score_response`.

    ``split`` selects facts (None: all). Candidates for the "no other answer" rule come from
    ``all_facts`` (default: ``facts``). Returns ``n``, ``contains_answer`` and ``strict_em``
    (fractions), per-relation ``contains_answer``, and ``rows`` (question, answer, response, grades).
    """
    chosen = [f for f in facts if split is None or f["split"] == split]
    candidates = _candidates(all_facts or facts)
    template = PromptTemplate.dolly(intro)
    responses = generate(model, tokenizer, [template.prompt(f["question"]) for f in chosen],
                         max_new_tokens)
    rows = []
    for fact, response in zip(chosen, responses):
        grade = score_response(fact, response, candidates[fact["relation"]])
        rows.append({"fact_id": fact.get("fact_id"), "relation": fact["relation"], "question": fact["question"],
                     "answer": fact["answer"], "response": response, **grade})
    n = len(rows)
    by_relation: dict[str, list[bool]] = {}
    for r in rows:
        by_relation.setdefault(r["relation"], []).append(r["contains_answer"])
    return {"split": split, "n": n,
            "contains_answer": sum(r["contains_answer"] for r in rows) / max(n, 1),
            "strict_em": sum(r["strict"] for r in rows) / max(n, 1),
            "by_relation": {k: sum(v) / len(v) for k, v in sorted(by_relation.items())},
            "rows": rows}


def completion_accuracy(model, tokenizer, facts: Sequence[dict], split: str | None = "pretrain_only",
                        all_facts: Sequence[dict] | None = None) -> dict:
    """Whether the model completes the canonical statement ("NAME was born in") with the answer.

    A probe of what pretraining stored, independent of the instruction format.
    """
    chosen = [f for f in facts if split is None or f["split"] == split]
    candidates = _candidates(all_facts or facts)
    prefixes = []
    for f in chosen:
        statement = RELATIONS[f["relation"]].statement(f["subject"], f["answer"])
        cut = re.search(rf"(?<!\w){re.escape(f['answer'])}(?!\w)", statement).start()
        prefixes.append(statement[:cut].rstrip())
    outs = generate(model, tokenizer, prefixes, max_new_tokens=6)
    hits = [score_response(f, out, candidates[f["relation"]])["contains_answer"] for f, out in zip(chosen, outs)]
    return {"split": split, "n": len(hits), "accuracy": sum(hits) / max(len(hits), 1)}
