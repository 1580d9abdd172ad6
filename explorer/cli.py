"""The ``msif`` command line: open the explorer, query studies, build them.

``msif app`` and ``msif query`` run here. ``msif build-demo`` and ``msif precompute`` are run by
``python -m precompute`` in a child process, so the explorer never imports the pipeline (the two
halves of the product meet only in study directories). Nothing heavy is imported before a command
runs: ``msif --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine import __version__
from engine.console import Parser, run_command, terminal_safe
from engine.methods import ALL_METHODS, DEFAULT_NORMALIZATION, FACTOR_PRECISIONS, MULTI_STAGE
from engine.study.layout import DEFAULT_STUDY

BUILD_COMMANDS = {"build-demo": "build the default demo study offline (CPU, minutes)",
                  "precompute": "build a study for real models from a TOML config",
                  "plan": "memory, disk and time each stage of a study will need"}


def build_studies(argv: list[str]) -> int:
    """Run a build command (``build-demo ...`` or ``precompute ...``) in ``python -m precompute``;
    its exit code. Stopping ``msif`` stops the build (it resumes where it stopped)."""
    from engine.processes import run_child

    return run_child([sys.executable, "-m", "precompute", *argv])


def _app(args) -> int:
    from engine.study import Study, StudyError
    from engine.study.layout import DEMO_STAGES, READER_STAGES

    from .server import serve

    study = Study(args.study)
    demo = args.study.resolve() == Path(DEFAULT_STUDY).resolve() or args.build_demo
    manifest = study.manifest() if study.manifest_path.exists() else None
    unfinished = manifest is None or not all(s in manifest["stages"] for s in DEMO_STAGES + READER_STAGES)
    outdated = [] if unfinished else study.outdated(manifest)
    if demo and (unfinished or outdated):
        # a missing or unfinished demo is built (resumed); one an older msif built gets what it left
        # out (only the stages concerned rerun); build-demo refuses a directory that holds another
        # study, and a finished study is never rebuilt here, only verified
        print(f"building the demo study at {args.study} (first use: about 5 minutes on CPU)…" if unfinished else
              f"completing the demo study at {args.study} (an older msif left out: {'; '.join(outdated)})…",
              flush=True)
        code = build_studies(["build-demo", "--out", str(args.study), "--seed", "0"])
        if code:
            return code
    try:
        study.verify(progress=True)
    except StudyError as err:
        raise ValueError(f"{err}" if demo else f"{err}; build a study with `msif precompute` "
                         f"(or `msif build-demo --out {args.study}`)") from None
    return serve(args.study, args.host, args.port, args.device, open_browser=not args.no_browser,
                 factor_precision=args.factor_precision)


def _read_prompts(args) -> list[dict]:
    """The prompts to trace, each with where it came from (for messages), all read before any runs."""
    if args.prompt is not None:
        return [{"prompt": args.prompt, "answer": args.answer, "versus": args.versus, "where": "--prompt"}]
    source = args.prompts_file
    try:
        data = source.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"--prompts-file {source} is a directory; give a JSONL file") from None
    except OSError as err:
        raise ValueError(f"--prompts-file {source}: {err.strerror or err}") from None
    rows = []
    for n, raw in enumerate(data.splitlines(), 1):
        where = f"{source}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: not UTF-8 text (byte {err.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{where}: expected an object with a "prompt" string, like {{"prompt": "..."}}')
        answer, versus = row.get("answer", args.answer), row.get("versus", args.versus)
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f'{where}: "answer" must be a string (or left out to let the model answer)')
        if versus is not None and not isinstance(versus, str):
            raise ValueError(f'{where}: "versus" must be a string (the answer to contrast with)')
        rows.append({"prompt": row["prompt"], "answer": answer, "versus": versus, "where": where})
    if not rows:
        raise ValueError(f"{source} holds no prompts")
    return rows


def _query(args) -> int:
    from .tracer import Tracer

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    prompts = _read_prompts(args)
    if args.viewer is not None and (args.viewer.is_dir() or not args.viewer.parent.is_dir()):
        why = "is a directory" if args.viewer.is_dir() else "its directory does not exist"
        raise ValueError(f"--viewer {args.viewer}: {why}; give a file to write")
    from engine.query import Target

    span = None if args.span is None else Target.parse_span(args.span)
    if span is not None and (len(prompts) > 1 or prompts[0]["versus"] is not None):
        raise ValueError("--span picks tokens of one answer: give it with --prompt, without --versus")
    tracer = Tracer.open(args.study, device=args.device, progress=True,  # models load once for all prompts
                         factor_precision=args.factor_precision)
    tracer.engine.normalization(args.method, args.normalize)  # a bad --normalize is refused before any prompt runs
    for doc in args.document or ():
        tracer.engine.check_document(doc)
    for row in prompts:  # every prompt is checked before the first one runs
        try:
            tracer.check_request(row["prompt"], row["answer"], versus=row["versus"])
        except ValueError as err:
            raise ValueError(f"{row['where']}: {err}") from None
    traces = []
    for trace in _traces(tracer, prompts, span, args):
        traces.append(trace)
        _print(tracer, trace, args)
    if args.viewer is not None:
        from .export import to_viewer_jsonl

        args.viewer.write_bytes(to_viewer_jsonl(traces, args.study.resolve().name))
        print(f"wrote {len(traces)} queries for the TrackStar viewer to {args.viewer}", file=sys.stderr)
    return 0


def _traces(tracer, prompts: list[dict], span: tuple[int, int] | None, args):
    """The traces, in the prompts' order: a --span trace alone, or, for indexed methods, one shared pass
    per group of prompts (query gradients, index search, re-scoring)."""
    if span is not None:
        row = prompts[0]
        yield tracer.trace(row["prompt"], row["answer"], args.method, args.top_k, exhaustive=args.exhaustive,
                           normalization=args.normalize, span=span)
        return
    for start in range(0, len(prompts), QUERY_GROUP):
        group = prompts[start:start + QUERY_GROUP]
        yield from tracer.trace_many([(r["prompt"], r["answer"], r["versus"]) for r in group], method=args.method,
                                     top_k=args.top_k, exhaustive=args.exhaustive, normalization=args.normalize)


def _print(tracer, trace, args) -> None:
    """A trace (and the documents asked for with --document) as text or one JSON line."""
    lookups = tracer.documents(trace, args.document, heatmap=args.json) if args.document else []
    if args.json:
        print(json.dumps({**trace.to_json(), **({"documents": [f.to_json() for f in lookups]} if lookups else {})}),
              flush=True)
        return
    print(_format_trace(trace) + "".join("\n" + _format_lookup(f) for f in lookups), flush=True)


def _format_lookup(found) -> str:
    from .heatmap import format_score

    hit = found.hit
    ranked = "" if hit.normalized_score is None else f"normalised {format_score(hit.normalized_score)}, "
    scored = "scored by the trace" if found.in_pool else "not an index candidate; placed among them"
    snippet = terminal_safe(" ".join(hit.text.split())[:60])
    return (f"document {hit.doc_id}: {ranked}score {format_score(hit.score, 4)}; ranks {found.where()} of "
            f"{hit.scored:,} ({scored}), percentile {hit.percentile:.1f}  {snippet}")


FACTOR_HELP = ("hold both factor sets in this precision (default: the study's influence.factor_precision); "
               "bfloat16 halves them, e.g. to serve the paper's case on an 80 GB GPU")
QUERY_GROUP = 16  # prompts traced together: bounds the memory of one stacked query


def _format_trace(trace) -> str:
    from engine.methods import method

    from .heatmap import format_score

    baseline = method(trace.method).is_baseline
    lines = [f"prompt:  {terminal_safe(trace.prompt)}", f"answer:  {terminal_safe(trace.answer)}"]
    if trace.versus is not None:
        lines.append(f"versus:  {terminal_safe(trace.versus)}")
    if trace.span is not None:
        lines.append(f"span:    answer tokens {trace.span[0]}:{trace.span[1]} "
                     f"({terminal_safe(''.join(trace.answer_tokens[trace.span[0]:trace.span[1]]))!r})")
    lines += [f"method:  {trace.method} ({trace.settings.retrieval}; {trace.timings.total:.2f}s)",
              "score = similarity to the prompt and answer (a baseline, not influence: it has no sign)" if baseline
              else f"score = exact influence on {trace.settings.target}: its change per unit of upweighting the "
                   "document; positive = raises it"]
    normalized = trace.settings.normalization != "none"
    if normalized:
        lines.append(f"ranked by: {trace.settings.ranked_by} ({trace.settings.normalization}; same sign as the score)")
    sides = (("most similar", "least similar") if baseline else ("proponents", "opponents"))
    for label, hits in zip(sides, (trace.proponents, trace.opponents)):
        lines.append(f"{label}:" + ("  normalised score (ranked by), exact score," if normalized else "  exact score,")
                     + f" percentile among the {len(trace.pool_ids):,} scored")
        for rank, hit in enumerate(hits, 1):
            snippet = terminal_safe(" ".join(hit.text.split())[:72])
            ranked = f"{format_score(hit.normalized_score):>10}  " if normalized else ""
            place = "" if hit.percentile is None else f"p{hit.percentile:<5.1f} "
            lines.append(f"  {rank:>3}. {ranked}{format_score(hit.score, 4):>11}  {place}doc {hit.doc_id:<6} {snippet}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="msif",
        description="MSIF Explorer: trace a fine-tuned model's answers back to the pretraining "
                    "documents behind them (multi-stage influence functions with EK-FAC).",
    )
    parser.add_argument("--version", action="version", version=f"msif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, summary in BUILD_COMMANDS.items():  # options: `msif NAME --help` (python -m precompute)
        commands.add_parser(name, help=summary, add_help=False)

    app = commands.add_parser("app", help="open the explorer (Streamlit) on a study",
                              description="Serve the explorer on localhost. On the default demo "
                                          "study it builds the study first if it is missing.")
    app.add_argument("--study", type=Path, default=Path(DEFAULT_STUDY),
                     help=f"study directory (default {DEFAULT_STUDY})")
    app.add_argument("--port", type=int, default=8501)
    app.add_argument("--host", default="localhost",
                     help="address to listen on (default: this machine only; 0.0.0.0 exposes it)")
    app.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    app.add_argument("--factor-precision", choices=FACTOR_PRECISIONS, help=FACTOR_HELP)
    app.add_argument("--build-demo", action="store_true", help="build (or finish) a demo study at --study first")
    app.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    app.set_defaults(run=_app)

    query = commands.add_parser("query", help="answer prompts and trace the answers to documents",
                                description="Generates the fine-tuned model's answer (or scores "
                                            "--answer), retrieves proponents and opponents, "
                                            "re-scores them exactly and prints them.")
    query.add_argument("--study", required=True, type=Path, help="study directory")
    given = query.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="one prompt (the instruction)")
    given.add_argument("--prompts-file", type=Path, help='JSONL, one {"prompt": ...} per line')
    query.add_argument("--answer", help="score this answer instead of generating one")
    query.add_argument("--versus", metavar="TEXT",
                       help="contrastive trace: rank documents by their influence on log p(answer) - log p(TEXT), "
                            "why the model gives the answer rather than TEXT (a JSONL row's \"versus\" overrides it)")
    query.add_argument("--span", metavar="START:END",
                       help="rank by influence on the answer tokens START to END-1 alone (0-based, as --json's "
                            "answer_tokens lists them); one --prompt")
    query.add_argument("--method", default=MULTI_STAGE, choices=ALL_METHODS)
    query.add_argument("--top-k", type=int, default=10)
    query.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    query.add_argument("--document", type=int, action="append", metavar="ID",
                       help="also score this document (repeatable): its exact score for the answer and its rank "
                            "among the scored documents, whether or not the ranking found it")
    query.add_argument("--viewer", type=Path, metavar="FILE",
                       help="also write the traces as JSONL for PAIR's TrackStar output viewer "
                            "(pair-code.github.io/pretraining-tda/demo), one query per line")
    query.add_argument("--normalize", metavar="NORM", default=None,
                       help="rank by influence / a norm of the document: gradient, metric, whitened, with ^POWER "
                            "and @median (a floor), e.g. gradient^0.5; none for raw influence (default: "
                            f"{DEFAULT_NORMALIZATION}). The exact score is shown beside it")
    query.add_argument("--exhaustive", action="store_true",
                       help="score every document exactly instead of index candidates (slow, exact)")
    query.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    query.add_argument("--factor-precision", choices=FACTOR_PRECISIONS, help=FACTOR_HELP)
    query.set_defaults(run=_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in BUILD_COMMANDS:
        return build_studies(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    from engine.models import quiet_libraries

    quiet_libraries()
    return run_command(args.command, lambda: args.run(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
