"""Command-line plumbing shared by ``scripts/*.py``: one-line errors, logging, config files."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from .errors import UsageError


class OneLineErrors:
    """Parser mixin: argparse errors become ``UsageError`` (one ``error:`` line and exit 2 under
    :func:`main_guard`) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UsageError(message)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors."""


def hf_argument_parser(dataclass_types: list, **kwargs: Any):
    """``transformers.HfArgumentParser`` over ``dataclass_types`` with one-line errors."""
    from transformers import HfArgumentParser

    class Parser(OneLineErrors, HfArgumentParser):
        pass

    return Parser(dataclass_types, **kwargs)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main_guard(main: Callable[[], Any], resumable: bool = False) -> None:
    """Run ``main``; user mistakes (``UsageError``) become one line and exit 2, not a traceback.
    Ctrl-C exits 130 quietly (``resumable``: with a hint that ``--resume`` continues)."""
    try:
        main()
    except UsageError as err:
        fail(str(err))
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue from the last checkpoint" if resumable else ""
        print(f"interrupted{hint}", file=sys.stderr)
        raise SystemExit(130)


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def read_config_file(path: str) -> dict[str, Any]:
    """Flag values from a YAML or JSON file (``{flag_name: value}``)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config: no such file {path!r}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:
        raise UsageError(f"--config {path!r}: cannot parse ({type(err).__name__})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path!r}: expected a mapping of flag names to values")
    return values
