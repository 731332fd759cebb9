"""User-facing errors.

A :class:`UsageError` is a mistake in what the user asked for (a bad flag value, an unknown name, a dataset
without the named column). ``scripts/*.py`` catch it, print its one-line message and exit with status 2,
without a traceback and before any result file is written. Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

from typing import Iterable


class UsageError(ValueError):
    """A one-line, user-facing error: the bad value and, where there are any, the valid choices."""


def unknown_choice(kind: str, value: object, choices: Iterable[str]) -> UsageError:
    """Build the standard "unknown X 'v'; choose one of: a, b, c" error."""
    return UsageError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(choices))}")


def lookup(registry: dict, kind: str, name: str):
    """``registry[name]``, or a :class:`UsageError` listing the valid names."""
    try:
        return registry[name]
    except KeyError:
        raise unknown_choice(kind, name, registry) from None
