"""The ``msif`` command line: build studies offline, query them, open the explorer."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine import __version__


def _precompute(args) -> int:
    from .config import StudyConfig
    from .pipeline import run_pipeline

    config = StudyConfig.from_toml(args.config)
    study = run_pipeline(config, args.out, progress=not args.quiet)
    print(f"study ready: {study.root}")
    return 0


def _build_demo(args) -> int:
    import time

    from .demo import build_demo, qa_summary, tiny_recipe

    started = time.perf_counter()
    study = build_demo(args.out, seed=args.seed, recipe=tiny_recipe() if args.tiny else None,
                       progress=not args.quiet)
    qa = qa_summary(study)["pretrain_only"]
    print(f"demo study ready: {study.root} ({time.perf_counter() - started:.0f}s this run)")
    print(f"fine-tuned model on pretraining-only questions: {100 * qa['contains_answer']:.1f}% "
          f"answer correctly, {100 * qa['strict_em']:.1f}% word for word (n={qa['n']})")
    return 0


DEMO_STUDY = Path("studies/demo")


def _app(args) -> int:
    from .study import Study, StudyError

    study = args.study
    if args.study.resolve() == DEMO_STUDY.resolve() or args.build_demo:
        from .demo import build_demo

        print(f"checking the demo study at {study} (built on first use, about 5 minutes on CPU)…",
              flush=True)
        build_demo(study, seed=0, progress=True)  # idempotent: finished stages are skipped
    else:
        try:
            from explorer.tracer import REQUIRED_STAGES
            Study(study).verify(REQUIRED_STAGES)
        except StudyError as err:
            raise ValueError(f"{err}; build it with `msif precompute` (or `msif build-demo --out {study}`)") from None
    return serve(study, args.host, args.port, args.device, open_browser=not args.no_browser)


def wait_until_serving(url: str, process, timeout: float) -> bool:
    """True once the Streamlit server at ``url`` answers its health check; False if ``process``
    exits or ``timeout`` seconds pass first."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            return True
        except OSError:
            time.sleep(0.1)
    return False


def serve(study: Path, host: str, port: int, device: str = "auto", open_browser: bool = False) -> int:
    """Run the Streamlit app on ``study`` until interrupted; returns the server's exit code."""
    import os
    import signal
    import subprocess
    import webbrowser

    app = Path(__file__).resolve().parents[1] / "explorer" / "app.py"
    env = dict(os.environ, MSIF_STUDY=str(study.resolve()), MSIF_DEVICE=device)
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host,
               "--server.port", str(port), "--server.headless", "true",
               "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
               "--theme.base", "light", "--client.toolbarMode", "viewer"]
    server = subprocess.Popen(command, env=env)
    url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}"

    def stop(signum, frame):  # a terminated `msif app` must not leave its server running
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if not wait_until_serving(url, server, timeout=60) and server.poll() is not None:
            return server.returncode
        print(f"\nMSIF Explorer on {study}: {url}  (Ctrl+C stops it)", flush=True)
        # Without a display, webbrowser would start a console browser (lynx) in this terminal.
        if open_browser and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY")
                             or os.environ.get("WAYLAND_DISPLAY")):
            webbrowser.open(url)
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        return 0


def _read_prompts(args) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": args.prompt, "answer": args.answer}]
    rows = []
    for n, line in enumerate(Path(args.prompts_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{args.prompts_file}:{n}: not JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{args.prompts_file}:{n}: expected {{"prompt": "..."}}')
        rows.append({"prompt": row["prompt"], "answer": row.get("answer", args.answer)})
    if not rows:
        raise ValueError(f"{args.prompts_file} holds no prompts")
    return rows


def _query(args) -> int:
    from explorer.tracer import Tracer

    prompts = _read_prompts(args)
    tracer = Tracer(args.study, device=args.device)  # models load once for all prompts
    for row in prompts:
        trace = tracer.trace(row["prompt"], row["answer"], method=args.method, top_k=args.top_k,
                             exhaustive=args.exhaustive)
        if args.json:
            print(json.dumps(trace.to_json()), flush=True)
        else:
            print(_format_trace(trace), flush=True)
    return 0


def _format_trace(trace) -> str:
    lines = [f"prompt:  {trace.prompt}", f"answer:  {trace.answer}", f"method:  {trace.method} ({trace.settings['retrieval']}; "
             f"{trace.timings['total']:.2f}s)", "positive = raises the answer's log-likelihood"]
    for label, hits in (("proponents", trace.proponents), ("opponents", trace.opponents)):
        lines.append(f"{label}:")
        for rank, hit in enumerate(hits, 1):
            snippet = " ".join(hit.text.split())[:90]
            lines.append(f"  {rank:>3}. {hit.score:+.4e}  doc {hit.doc_id:<6} {snippet}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msif",
        description="MSIF Explorer: trace a fine-tuned model's answers back to the pretraining "
                    "documents behind them (multi-stage influence functions with EK-FAC).",
    )
    parser.add_argument("--version", action="version", version=f"msif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    pre = commands.add_parser("precompute", help="build a study for real models from a TOML config",
                              description="Fit EK-FAC factors for both stages, project pretraining "
                                          "gradients and index them. Resumable: run it again after "
                                          "an interruption.")
    pre.add_argument("--config", required=True, type=Path, help="study.toml (see assets/configs/)")
    pre.add_argument("--out", required=True, type=Path, help="study directory to create or resume")
    pre.add_argument("--quiet", action="store_true", help="no progress bars")
    pre.set_defaults(run=_precompute)

    demo = commands.add_parser("build-demo", help="build the default demo study offline (CPU, minutes)",
                               description="Generate a world with known facts, pretrain a small "
                                           "GPT-NeoX on it, fine-tune a dolly-style child, and run "
                                           "the influence pipeline. Idempotent and resumable.")
    demo.add_argument("--out", required=True, type=Path, help="study directory to create or resume")
    demo.add_argument("--seed", type=int, default=0, help="same seed, same study")
    demo.add_argument("--tiny", action="store_true", help="a seconds-sized world (tests, CI)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_build_demo)

    app = commands.add_parser("app", help="open the explorer (Streamlit) on a study",
                              description="Serve the explorer on localhost. On the default demo "
                                          "study it builds the study first if it is missing.")
    app.add_argument("--study", type=Path, default=DEMO_STUDY, help=f"study directory (default {DEMO_STUDY})")
    app.add_argument("--port", type=int, default=8501)
    app.add_argument("--host", default="localhost",
                     help="address to listen on (default: this machine only; 0.0.0.0 exposes it)")
    app.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    app.add_argument("--build-demo", action="store_true", help="build (or finish) a demo study at --study first")
    app.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    app.set_defaults(run=_app)

    from explorer.tracer import ALL_METHODS  # light: no model is loaded at import

    query = commands.add_parser("query", help="answer prompts and trace the answers to documents",
                                description="Generates the fine-tuned model's answer (or scores "
                                            "--answer), retrieves proponents and opponents, "
                                            "re-scores them exactly and prints them.")
    query.add_argument("--study", required=True, type=Path, help="study directory")
    given = query.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="one prompt (the instruction)")
    given.add_argument("--prompts-file", type=Path, help='JSONL, one {"prompt": ...} per line')
    query.add_argument("--answer", help="score this answer instead of generating one")
    query.add_argument("--method", default="multi-stage", choices=ALL_METHODS)
    query.add_argument("--top-k", type=int, default=10)
    query.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    query.add_argument("--exhaustive", action="store_true",
                       help="score every document exactly instead of index candidates (slow, exact)")
    query.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    query.set_defaults(run=_query)
    return parser


def quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-file bars are noise."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    quiet_libraries()
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"msif {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
