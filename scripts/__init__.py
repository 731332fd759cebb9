"""The ``samat`` command: one entry point for the command lines in this folder.

    samat run --task vision --method sam      # same as: accelerate launch scripts/run.py --task vision ...
    samat sweep --task vision --seeds 0 1 2
    samat report runs/sweep-vision
    samat <command> --help

Each command runs its script exactly as ``python scripts/<script>.py`` would (same flags, same exit codes);
``accelerate launch scripts/run.py`` stays the way to launch several processes or mixed precision.
"""

from __future__ import annotations

import runpy
import sys
from typing import Optional, Sequence

# command -> (module under samat.scripts, one line for `samat --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "train one model with one method on one task, then evaluate it"),
    "sweep": ("sweep", "a grid of methods x rho x eps x seeds, resumable"),
    "reproduce": ("reproduce", "train the paper's grid for one task and write a verdict per claim (a)-(c)"),
    "report": ("report", "tables, CSVs and figures from finished runs"),
    "toy": ("toy", "the robust/non-robust feature toy model (claim d)"),
    "evaluate": ("evaluate", "attack saved runs or hub/timm/local models side by side, no retraining"),
    "attack-text": ("attack_text", "TextAttack recipes against saved text models"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: samat <command> [flags]   (samat <command> --help for its flags)\n\ncommands:\n" + "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"samat {name}", *rest]  # argparse names the program after argv[0]
    # alter_sys would reset argv[0] to the file name; the module runs as __main__ either way
    runpy.run_module(f"samat.scripts.{COMMANDS[name][0]}", run_name="__main__")
