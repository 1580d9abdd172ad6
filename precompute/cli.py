"""The ``msif`` command line."""

from __future__ import annotations

import argparse
import sys

from engine import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msif",
        description="MSIF Explorer: trace a fine-tuned model's answers back to the pretraining "
                    "documents behind them (multi-stage influence functions with EK-FAC).",
    )
    parser.add_argument("--version", action="version", version=f"msif {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND",
                          title="commands (build-demo, precompute, query and app arrive with the pipeline)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
