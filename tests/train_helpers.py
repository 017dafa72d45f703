"""Tiny ID / auxiliary / OOD / synthetic kood datasets from sklearn digits, for training tests."""

from __future__ import annotations

import os

import numpy as np
from sklearn.datasets import load_digits

from kood.writer import write_arrays


def digits_arrays(classes, rng_seed: int = 0):
    """uint8 [N, 8, 8, 1] images (0..255) and labels of the given digit classes."""
    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images = np.clip(digits.images[keep] * 16, 0, 255).astype(np.uint8)[..., None]
    labels = digits.target[keep]
    order = np.random.default_rng(rng_seed).permutation(len(images))
    return images[order], labels[order]


def make_digit_sets(root: str) -> dict[str, str]:
    """ID = digits 0-4 (train/test), aux = 5-7, OOD = 8-9, syn = noisy copies of ID train."""
    dirs = {role: os.path.join(root, role) for role in ("id", "aux", "ood", "syn")}
    x, y = digits_arrays([0, 1, 2, 3, 4])
    write_arrays(dirs["id"], {"train": (x[:600], y[:600]), "test": (x[600:], y[600:])}, num_classes=5)
    xa, _ = digits_arrays([5, 6, 7])
    write_arrays(dirs["aux"], {"train": (xa, -np.ones(len(xa), np.int64))}, kind="outlier", num_classes=0)
    xo, _ = digits_arrays([8, 9])
    write_arrays(dirs["ood"], {"test": (xo, -np.ones(len(xo), np.int64))}, kind="ood", num_classes=0)
    noise = np.random.default_rng(1).integers(-20, 20, x[:300].shape)
    xs = np.clip(x[:300].astype(int) + noise, 0, 255).astype(np.uint8)
    write_arrays(dirs["syn"], {"train": (xs, y[:300])}, kind="synthetic", num_classes=5)
    return dirs
