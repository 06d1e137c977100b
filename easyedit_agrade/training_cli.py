"""``easyedit-agrade train --alg {AGRADE,InstructEdit} ...``: forwards to the method's trainer entry point."""
from __future__ import annotations

import argparse
import importlib
from typing import Sequence

from .registry import METHODS

#: alg_name -> module whose ``train_main(argv)`` trains that method (from the one method table)
TRAINERS = {m.alg_name: m.trainer_module for m in METHODS}


def train_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="easyedit-agrade train",
        description="Train a hypernetwork editor. Options after --alg are the trainer's own "
        "(see `easyedit-agrade train --alg AGRADE --help`).",
        add_help=False,
    )
    parser.add_argument("--alg", choices=sorted(TRAINERS), default="AGRADE", help="method to train")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help and "--alg" not in (argv or []):
        parser.print_help()
        return 0
    if args.help:
        rest = [*rest, "--help"]
    module = importlib.import_module(TRAINERS[args.alg])
    return int(module.train_main(rest) or 0)
