"""Run the side-by-side benchmarks: ``python -m bench.run [--quick] [--only NAME ...] [--write]``.

Options: ``--quick`` (small sizes, a smoke run), ``--only NAME [NAME ...]`` (run the bench modules
whose name contains any of the NAMEs; repeatable, e.g. ``--only hmm kalman``), ``--repeats N``
(timed runs per callable, median reported), ``--threads N`` (torch intra-op threads).

Each ``bench/bench_*.py`` module contributes ``cases(quick)``; the table reports median
seconds for graphppl and each peer, and the ratio peer / ours (> 1: graphppl is faster).
A module may also define ``targets(rows) -> list[str]``: verdicts on performance targets,
computed from its measured rows, listed under the table. A module without ``cases`` is a standalone
script with its own command line (``python -m bench.bench_svae_gmm``, fits too long for repeated timing):
it is named and skipped here.
``--write`` stores the table, the command and the machine in ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

from bench.harness import format_table, machine_description, run_case


def discover_modules(only: list[str] | None) -> list[str]:
    """Names of the ``bench.bench_*`` modules, optionally only those containing a substring in ``only``."""
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    return [n for n in names if not only or any(o in n for o in only)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", action="extend", nargs="+", default=None, metavar="NAME",
                        help="run only bench modules whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, verdicts = [], []
    for name in discover_modules(args.only):
        module = importlib.import_module(f"bench.{name}")
        if not hasattr(module, "cases"):
            print(f"skipping bench.{name}: a standalone script (python -m bench.{name})", file=sys.stderr)
            continue
        module_rows = []
        for case in module.cases(args.quick):
            print(f"running {case.task} ...", file=sys.stderr, flush=True)
            module_rows.extend(run_case(case, args.repeats))
        rows.extend(module_rows)
        if hasattr(module, "targets"):
            verdicts.extend(module.targets(module_rows))
    table = format_table(rows)
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    report = f"Machine: {machine_description()}\n\nCommand: `{command.strip()}`\n\n{table}\n"
    if verdicts:
        report += "\n## Performance targets (from the rows above)\n\n" + "\n".join(
            f"- {v}" for v in verdicts) + "\n"
    print(report)
    if args.write:
        out = Path(__file__).parent / "RESULTS.md"
        out.write_text("# Benchmark results\n\nRatios are peer time / graphppl time "
                       "(> 1 means graphppl is faster), medians of repeated runs.\n\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
