#!/usr/bin/env python
"""What one training batch of the vision default costs the input pipeline alone (no model): 128 items of the
decoded-once Fashion-MNIST subset, augmented (seeded crop and flip per example) and collated, timed and profiled
on one torch thread.

    python bench/loader_profile.py > bench/results/vision_batch_profile_cpu.txt
"""

import cProfile
import io
import pstats
import time

import torch

from samat.vision.data import ImageClassification, collate, load_dataset_dict


def main() -> None:
    torch.set_num_threads(1)
    dsd = load_dataset_dict("fashion_mnist")
    ds = ImageClassification(dsd["train"].select(range(5000)), "image", "label", 1, None, augment=True, seed=0)
    ds.set_epoch(0)
    rows = list(range(0, 5000, 39))[:128]
    for _ in range(3):
        collate(ds.__getitems__(rows))
    n = 20
    started = time.perf_counter()
    for _ in range(n):
        collate(ds.__getitems__(rows))
    print(f"one batch of {len(rows)} (augment + collate): {1000 * (time.perf_counter() - started) / n:.2f} ms")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(10):
        collate(ds.__getitems__(rows))
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
    print(out.getvalue().replace("/work/pp23/samat/", "samat/"))


if __name__ == "__main__":
    main()
