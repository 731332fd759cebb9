"""One home for what samat reads from disk instead of the network: the cache folder, the hub probe, and the
embedded Fashion-MNIST (vision and segmentation defaults).

- Cache: ``$SAMAT_CACHE`` (default ``~/.cache/samat``) holds every built dataset, converted word vector and
  fetched wheel; builds are serialised across processes by :func:`cache_lock`.
- Hub: :func:`probe_hub` sets ``HF_HUB_OFFLINE=1`` up front when the hub cannot be reached, so a missing hub
  id fails at once with one line instead of after ~25 s of retries per file.
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` IDX files (``$SAMAT_FASHION_MNIST_DIR`` overrides the
  folder), else the hub twin ``zalando-datasets/fashion_mnist``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np

from .errors import UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


# ---------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """The project's cache folder: ``$SAMAT_CACHE`` or ``~/.cache/samat`` (created)."""
    path = Path(os.environ.get("SAMAT_CACHE", Path.home() / ".cache" / "samat")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialise building one cache entry across processes (``accelerate launch`` starts several)."""
    import filelock

    with filelock.FileLock(str(cache_dir() / f".{name}.lock")):
        yield


# ------------------------------------------------------------------------------------------------ hub


@functools.lru_cache(maxsize=None)
def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (cached per process).

    A thread bounds DNS resolution too, which ``create_connection``'s timeout does not cover."""
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def hub_host() -> str:
    """Host name of the Hugging Face hub endpoint (``$HF_ENDPOINT`` or huggingface.co). Reads the
    environment only, so it can run before ``huggingface_hub`` is imported."""
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def hub_reachable() -> bool:
    """Whether the Hugging Face hub can be reached (``HF_HUB_OFFLINE=1`` counts as no)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and host_reachable(hub_host())


def probe_hub(timeout: float = 2.0) -> None:
    """Set ``HF_HUB_OFFLINE=1`` (and ``HF_DATASETS_OFFLINE=1``) when the hub cannot be reached.

    Skipped when the user already set ``HF_HUB_OFFLINE`` (either way) or ``SAMAT_NO_HUB_PROBE=1``. Must run
    before transformers/datasets are imported: they read the variable once, at import.
    """
    if "HF_HUB_OFFLINE" in os.environ or os.environ.get("SAMAT_NO_HUB_PROBE") == "1":
        return
    if not host_reachable(hub_host(), timeout=timeout):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        logging.getLogger("samat").info("Hugging Face hub unreachable: running offline (HF_HUB_OFFLINE=1)")


@contextlib.contextmanager
def hub_offline_if_unreachable() -> Iterator[bool]:
    """Within the block, make ``datasets``/``huggingface_hub`` use only their local cache when the hub cannot
    be reached (instead of retrying each file for ~25 s). Yields whether the hub is reachable."""
    reachable = hub_reachable()
    if reachable:
        yield True
        return
    import datasets
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# -------------------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("SAMAT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format) as uint8: images ``(N, 28, 28)``, labels ``(N,)``."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000): uint8 images ``(N, 28, 28)`` and int64 labels
    ``(N,)`` in 0..9.

    Read from Debian's IDX files; where they are absent, from the hub twin; ``UsageError`` saying what to
    install when neither works.
    """
    folder = fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if images_path.is_file() and labels_path.is_file():
        return read_idx(images_path), read_idx(labels_path).astype(np.int64)
    try:
        import datasets

        hub = datasets.load_dataset(FASHION_MNIST_HUB, split=split)
    except Exception as err:  # offline, or the hub refused: say what to install instead
        raise UsageError(
            f"the embedded dataset needs Fashion-MNIST: found no IDX files in {folder} (apt-get install "
            f"dataset-fashion-mnist, or set SAMAT_FASHION_MNIST_DIR) and the hub copy failed "
            f"({type(err).__name__}); or pass --dataset <hub id | save_to_disk folder>") from None
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in hub["image"]])
    return images, np.asarray(hub["label"], dtype=np.int64)
