"""Atomic writes: a reader (or a crash) sees the old file or folder, or the whole new one, never half of it.

Every file samat writes for users or caches goes through here: results, reports, CSVs, figures, caches of
built datasets and word vectors.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``. The file gets
    the usual 0666-less-umask mode (``mkstemp`` alone would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any) -> None:
    """JSON, indented, non-JSON values as ``str``."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def csv_bytes(header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    """A CSV of ``rows`` (dicts) with columns ``header`` (keys outside it are dropped; missing ones empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(header), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_csv_atomic(path: str | Path, header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    write_bytes_atomic(path, csv_bytes(header, rows))


@contextlib.contextmanager
def building_dir(final: str | Path) -> Iterator[Path]:
    """Build a folder beside ``final`` and move it into place only when the block succeeds.

    Yields an empty temp folder to fill. On success it becomes ``final``; if ``final`` appeared meanwhile
    (another process finished first) the new build is dropped. On error it is removed, so an interrupted
    build never looks complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; caches are shared like any folder
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
