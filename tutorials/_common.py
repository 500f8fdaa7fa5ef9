"""The start every tutorial script shares: its command line, torch's threads and seed, the figures folder.

A tutorial runs as ``python tutorials/<name>.py [--smoke] [--out DIR] [--threads N] [--seed S]`` (the tests
run each with ``--smoke``). This file sits next to the scripts, so a script finds it as ``_common``::

    from _common import parse_args, prepare

    args = parse_args("what the script shows", ("--smoke", "--out", "--threads", "--seed"))
    out = prepare(args)          # threads and seed set, figures folder created
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

FIGURES = Path(__file__).parent / "out"

HELP = {
    "--smoke": "tiny sizes and few steps (CI)",
    "--out": "folder for the figures",
    "--threads": "torch threads",
    "--seed": "seed of the simulated data and of torch's generator",
}

_OPTIONS = {
    "--smoke": dict(action="store_true"),
    "--out": dict(default=str(FIGURES)),
    "--threads": dict(type=int, default=1),
    "--seed": dict(type=int, default=0),
}


def parse_args(description: str, flags: tuple[str, ...], helps: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse the command line of a tutorial that takes the standard ``flags`` (keys of ``HELP``, listed by
    each script so its command line reads off the script); ``helps`` replaces the help text of some flags."""
    unknown = set(flags) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"parse_args: flags must be among {sorted(_OPTIONS)}, got {sorted(unknown)}")
    helps = {**HELP, **(helps or {})}
    parser = argparse.ArgumentParser(description=description)
    for flag in flags:
        parser.add_argument(flag, help=helps[flag], **_OPTIONS[flag])
    return parser.parse_args()


def prepare(args: argparse.Namespace) -> Path:
    """Use ``args.threads`` torch threads, seed torch's generator with ``args.seed`` and create the figures
    folder ``args.out``; returns it."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out
