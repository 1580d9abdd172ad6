"""The ``msif`` command line: build studies offline, query them, open the explorer."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"msif {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
