"""Building studies from the command line: ``python -m precompute build-demo|precompute ...``.

``msif build-demo`` and ``msif precompute`` run these commands; they live here so that the
explorer's ``msif`` never imports the pipeline (the two halves meet only in study directories).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine import __version__


def _precompute(args) -> int:
    from engine.study import StudyConfig

    from .pipeline import run_pipeline

    config = StudyConfig.from_toml(args.config)
    study = run_pipeline(config, args.out, progress=not args.quiet)
    print(f"study ready: {study.root}")
    return 0


def _build_demo(args) -> int:
    from .demo import build_demo, qa_summary, tiny_recipe

    started = time.perf_counter()
    study = build_demo(args.out, seed=args.seed, recipe=tiny_recipe() if args.tiny else None,
                       progress=not args.quiet)
    qa = qa_summary(study)["pretrain_only"]
    print(f"demo study ready: {study.root} ({time.perf_counter() - started:.0f}s this run)")
    print(f"fine-tuned model on pretraining-only questions: {100 * qa['contains_answer']:.1f}% "
          f"answer correctly, {100 * qa['strict_em']:.1f}% word for word (n={qa['n']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msif", description="Build MSIF studies offline.")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    from engine.models import quiet_libraries

    quiet_libraries()
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"msif {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msif {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
