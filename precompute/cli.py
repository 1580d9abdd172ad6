"""Building studies from the command line: ``python -m precompute build-demo|precompute ...``.

``msif build-demo`` and ``msif precompute`` run these commands; they live here so that the
explorer's ``msif`` never imports the pipeline (the two halves meet only in study directories).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from engine import __version__, distributed
from engine.console import Parser, run_command, with_option


def _precompute(args) -> int:
    from engine.study import StudyConfig

    from .pipeline import run_pipeline

    config = StudyConfig.from_toml(args.config)
    if distributed.is_main() and not args.quiet:
        _print_plan(config, args.nproc)
    study = run_pipeline(config, args.out, progress=not args.quiet, command=_recorded_command(args))
    if distributed.is_main():
        print(f"study ready: {study.root}")
        print(_index_line(study))
    return 0


def _index_line(study) -> str:
    """The search index in one line: kind, size, measured recall, the build's peak memory."""
    from engine.study import Stage

    record = study.manifest()["stages"][Stage.INDEX]
    search, peak = record["search"], record["usage"]["peak_host_bytes"] / 2**30
    text = f"index: {search['kind']} over {search['documents']:,} documents"
    if search["kind"] == "ivf":
        recall = search.get("recall", {}).get("whitened", {})
        text += (f" ({search['dims']} coordinates fit on queries, re-rank {search['rerank']:,} per sign; recall@10 of "
                 f"the whitened rows against a full scan: dot {recall.get('at_10', float('nan')):.3f}, cosine "
                 f"{recall.get('cosine_at_10', float('nan')):.3f})")
    return text + f"; the index stage's peak host memory {peak:.2f} GiB"


def _build_demo(args) -> int:
    from .demo import build_demo, qa_summary, tiny_recipe

    started = time.perf_counter()
    study = build_demo(args.out, seed=args.seed, recipe=tiny_recipe() if args.tiny else None,
                       progress=not args.quiet, extra_documents=args.extra_documents,
                       command=_recorded_command(args))
    if not distributed.is_main():
        return 0
    qa = qa_summary(study)["pretrain_only"]
    print(f"demo study ready: {study.root} ({time.perf_counter() - started:.0f}s this run)")
    print(_index_line(study))
    print(f"fine-tuned model on pretraining-only questions: {100 * qa['contains_answer']:.1f}% "
          f"answer correctly, {100 * qa['strict_em']:.1f}% word for word (n={qa['n']})")
    return 0


def _plan(args) -> int:
    from engine.plan import GIB, plan_study, report
    from engine.study import StudyConfig

    config = StudyConfig.from_toml(args.config)
    memory = _bytes(args.gpu_memory) if args.gpu_memory else None
    plan = plan_study(config, device=args.device, gpus=args.gpus, device_memory=memory, documents=args.documents,
                      records=args.records, model_config=args.model_config)
    print(report(plan, config))
    if args.json:
        import json

        print(json.dumps([{**vars(s), "parts": {k: v / GIB for k, v in s.parts.items()}} for s in plan.stages]))
    return 0


def _print_plan(config, nproc: int) -> None:
    """What each stage will need, before a long job starts (a warning where a stage does not fit)."""
    from engine.plan import plan_here, report

    try:
        plan = plan_here(config, gpus=max(1, nproc))
    except (OSError, ValueError) as err:  # no config.json reachable (offline hub id): no plan
        print(f"(no plan: {str(err).splitlines()[0]})", flush=True)
        return
    print(report(plan, config) + "\n", flush=True)


def _bytes(text: str) -> float:
    """'80GiB', '141GB', '24g' -> bytes."""
    units = {"gib": 2**30, "gb": 1e9, "g": 2**30, "mib": 2**20, "mb": 1e6}
    number = text.strip().lower()
    for unit, size in units.items():
        if number.endswith(unit):
            try:
                return float(number[: -len(unit)]) * size
            except ValueError:
                break
    raise ValueError(f"--gpu-memory {text!r}: give a size such as 80GiB or 141GB")


def _launch(argv: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes (one machine)."""
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
            and not a.startswith("--nproc=")]
    from engine.processes import run_child

    return run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                      str(nproc), "-m", "precompute", *rest])


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="msif", description="Build MSIF studies offline.")
    parser.add_argument("--version", action="version", version=f"msif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    build = Parser(add_help=False)  # the flags every build command takes
    build.add_argument("--out", required=True, type=Path, help="study directory to create or resume")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.add_argument("--nproc", type=int, default=1, help=NPROC_HELP)
    build.add_argument("--force", action="store_true", help=FORCE_HELP)
    build.add_argument("--private", action="store_true", help=PRIVATE_HELP)

    pre = commands.add_parser("precompute", parents=[build], help="build a study for real models from a TOML config",
                              description="Fit EK-FAC factors for both stages, project pretraining "
                                          "gradients and index them. Resumable: run it again after "
                                          "an interruption.")
    pre.add_argument("--config", required=True, type=Path, help="study.toml (see assets/configs/)")
    pre.set_defaults(run=_precompute)

    demo = commands.add_parser("build-demo", parents=[build],
                               help="build the default demo study offline (CPU, minutes)",
                               description="Generate a world with known facts, pretrain a small "
                                           "GPT-NeoX on it, fine-tune a dolly-style child, and run "
                                           "the influence pipeline. Idempotent and resumable.")
    demo.add_argument("--seed", type=int, default=0, help="same seed, same study")
    demo.add_argument("--tiny", action="store_true", help="a seconds-sized world (tests, CI)")
    demo.add_argument("--extra-documents", type=int, metavar="N",
                      help="add a haystack of N generated distractor documents to the corpus after training "
                           "(none of them states a world fact); a study grows or shrinks to N, recomputing only "
                           "new shards; default: keep the study's")
    demo.set_defaults(run=_build_demo)

    plan = commands.add_parser("plan", help="memory, disk and time each stage of a study will need",
                               description="Reads the model's config (no weights) and the study config, and "
                                           "prints per stage the peak device and host memory, disk and a "
                                           "time estimate, with what to change where a stage does not fit.")
    plan.add_argument("--config", required=True, type=Path, help="study.toml")
    plan.add_argument("--device", default="h200", choices=["h200", "h100", "a100", "cpu"])
    plan.add_argument("--gpus", type=int, default=1)
    plan.add_argument("--gpu-memory", help="memory per device, e.g. 80GiB (default: the device's)")
    plan.add_argument("--documents", type=int, help="pretraining documents (default: [pretraining] limit)")
    plan.add_argument("--records", type=int, help="fine-tuning records (default: [finetuning] limit)")
    plan.add_argument("--model-config", help="a directory with the model's config.json, for models.base "
                                             "offline (e.g. assets/models/pythia-2.8b)")
    plan.add_argument("--json", action="store_true", help="also print the stages as JSON")
    plan.set_defaults(run=_plan)
    return parser


FORCE_HELP = ("build even where --out holds another study (other seed or settings) or other files; "
              "stages whose settings are unchanged are kept")
PRIVATE_HELP = "study files readable by you alone (default: as your umask allows, usually group-readable)"
NPROC_HELP = ("processes on this machine, launched with torchrun (one per GPU, or CPU ranks with gloo); "
              "the result does not depend on it")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    from engine.models import quiet_libraries
    from engine.processes import die_with_parent

    quiet_libraries()
    if distributed.launched():
        die_with_parent()  # a torchrun worker ends with torchrun, even when torchrun is killed -9

    def run() -> int:
        if getattr(args, "nproc", 1) < 1:
            raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
        if (getattr(args, "extra_documents", None) or 0) < 0:
            raise ValueError(f"--extra-documents must be >= 0, got {args.extra_documents}")
        if args.command in BUILDS and not distributed.launched():  # torchrun's workers run under their parent's lock
            return _locked_build(args, argv)
        return args.run(args)

    try:
        return run_command(args.command, run, args.verbose)
    except KeyboardInterrupt:
        print(f"msif {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        distributed.finish()


BUILDS = ("build-demo", "precompute")


def _locked_build(args, argv: list[str]) -> int:
    """A build holds its study's lock throughout, refuses a directory holding another study unless
    --force, and records the command that rebuilds it (for repair messages)."""
    from engine.study.lock import BuildLock

    if args.private:
        os.umask(0o077)  # inherited by torchrun's workers
    study, key, expected = _identity(args)  # a bad config is reported before anything is created
    study.check_overwrite(key, expected, args.force)
    with BuildLock(study.root, _recorded_command(args)) as lock:
        if lock.took_over:
            print(f"(took over the build lock of pid {lock.took_over.get('pid')}, which is no longer running)",
                  file=sys.stderr)
        study.check_overwrite(key, expected, args.force)  # again, now that no other build can be writing
        study.remove_temporaries()  # a killed build's half-written files
        # the build records which study it is (and this command) before anything else: a resumed build is the same
        return _launch(argv, args.nproc) if args.nproc > 1 else args.run(args)


def _recorded_command(args) -> list[str]:
    """The command that rebuilds this study, as recorded in its manifest: without --force or --nproc,
    with absolute paths, so that it works from any working directory."""
    argv = [a for i, a in enumerate(args.argv) if a != "--force" and a != "--nproc" and not a.startswith("--nproc=")
            and (i == 0 or args.argv[i - 1] != "--nproc")]
    command = ["msif", *argv]
    for option, value in (("--out", args.out), ("--config", getattr(args, "config", None))):
        if value is not None:
            command = with_option(command, option, str(Path(value).resolve()))
    return command


def _identity(args):
    """The study at --out, the manifest entry that says which study it is, and its value for this
    command (the demo's seed and recipe, or the study's config)."""
    from engine.study import Study, StudyConfig

    if args.command == "build-demo":
        from .demo import DemoRecipe, recipe_json, tiny_recipe

        key, expected = "demo", {"seed": args.seed, "recipe": recipe_json(tiny_recipe() if args.tiny else DemoRecipe())}
    else:
        key, expected = "config", StudyConfig.from_toml(args.config).to_dict()
    return Study(args.out), key, expected
