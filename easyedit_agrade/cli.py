"""``easyedit-agrade`` command line: train, edit, bench, demo, info.

Each subcommand forwards its remaining arguments to the module that implements it (which has its own
``--help``), so the CLI stays a thin face over the library.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

#: subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "easyedit_agrade.training_cli",
        "train_main",
        "train a hypernetwork editor (AGRADE or InstructEdit); resumable, checkpoints in safetensors",
    ),
    "edit": (
        "easyedit_agrade.bench.edit_cli",
        "edit_main",
        "edit a model with a JSON/JSONL file of requests (zsRE MEND, CounterFact MEND or KnowEdit format)",
    ),
    "bench": (
        "easyedit_agrade.bench",
        "bench_main",
        "benchmark AGRADE, MALMEN, InstructEdit and EasyEdit's baselines side by side (tables, JSON, plots)",
    ),
    "stats": (
        "easyedit_agrade.models.agrade.preserved_cli",
        "stats_main",
        "compute/cache the key statistics C₀ of AGRADE's preserved-knowledge term for an hparams YAML",
    ),
    "demo": (
        "easyedit_agrade.tools.demo",
        "demo_main",
        "the main job: batch-edit facts in the embedded model through EasyEdit and show before/after",
    ),
    "info": (
        "easyedit_agrade.cli",
        "info_main",
        "print versions, the EasyEdit generation, registration status and where models/data are found",
    ),
}


def info_main(argv: Sequence[str] | None = None) -> int:
    """Print the environment as the plugin sees it."""
    argparse.ArgumentParser(prog="easyedit-agrade info", description=COMMANDS["info"][2]).parse_args(argv)
    import platform

    import torch
    import transformers

    from . import __version__
    from .paths import cache_dir, data_dir

    print(f"easyedit-agrade {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}, torch {torch.__version__} "
          f"(cuda available: {torch.cuda.is_available()}), transformers {transformers.__version__}")
    try:
        from .integration.easyedit import easyedit_generation, register

        print(f"EasyEdit generation: {easyedit_generation()}, registered: {register()}")
    except ImportError as exc:
        print(f"EasyEdit: not importable ({exc})")
    print(f"cache: {cache_dir()}")
    print(f"shared data: {data_dir()} ({'present' if data_dir().exists() else 'absent'})")
    return 0


def _resolve(name: str) -> Callable[[Sequence[str]], int]:
    module, func, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easyedit-agrade",
        description="AGRADE and InstructEdit knowledge editors for EasyEdit. "
        "Run `easyedit-agrade <command> --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    return int(_resolve(command)(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
