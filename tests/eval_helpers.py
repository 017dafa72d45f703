"""Shared helpers for the detector / metrics / evaluate tests: a tiny classifier trained on sklearn
digits (8x8x1) in a few seconds, synthetic OOD images, and dataset directories written with
kood.writer.write_arrays."""

from __future__ import annotations

import functools
import os

import keras
import numpy as np

from kood.writer import write_arrays

NUM_CLASSES = 10


def tiny_classifier(input_shape=(8, 8, 1), num_classes: int = NUM_CLASSES, mean=(70.0,), std=(95.0,),
                    hidden: int = 32) -> keras.Model:
    """A kood-style functional classifier: pixels -> normalize -> MLP -> features (ReLU) -> classifier."""
    inputs = keras.Input(shape=input_shape, dtype="float32", name="pixels")
    x = keras.layers.Normalization(mean=list(mean), variance=[s ** 2 for s in std], name="normalize")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(hidden, activation="relu")(x)
    features = keras.layers.Activation("linear", name="features")(x)
    logits = keras.layers.Dense(num_classes, name="classifier")(features)
    return keras.Model(inputs, logits, name="tiny")


@functools.lru_cache(maxsize=None)
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as uint8 images [N, 8, 8, 1] (0..255): (x_train, y_train, x_test, y_test), 1400/397."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def noise_images(n: int, shape=(8, 8, 1), seed: int = 1) -> np.ndarray:
    """Far-OOD: uniform random uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def trained_digits_model() -> keras.Model:
    """The tiny classifier trained on digits for 30 epochs (~2 s on CPU; test accuracy ~0.95)."""
    x_train, y_train, _, _ = digits_arrays()
    keras.utils.set_random_seed(0)
    model = tiny_classifier(mean=(float(x_train.mean()),), std=(float(x_train.std()),))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train.astype(np.float32), y_train, batch_size=64, epochs=30, verbose=0)
    return model


def outputs_of(model: keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """{"logits", "features"} of float pixel images, via the layer names."""
    net = keras.Model(model.input, {"logits": model.get_layer("classifier").output,
                                     "features": model.get_layer("features").output})
    out = net(np.asarray(images, np.float32), training=False)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def write_eval_sets(root: str, n_ood: int = 200) -> dict[str, str]:
    """Writes under `root`: `id` (digits train/test), `noise` (8x8x1 uniform noise, test split),
    `big` (16x16x1 noise), `rgb` (8x8x3 noise), and `model.keras` (the trained tiny model).
    Returns the paths by name."""
    x_train, y_train, x_test, y_test = digits_arrays()
    paths = {name: os.path.join(root, name) for name in ("id", "noise", "big", "rgb")}
    write_arrays(paths["id"], {"train": (x_train, y_train), "test": (x_test, y_test)})
    unlabelled = -np.ones(n_ood, np.int64)
    write_arrays(paths["noise"], {"test": (noise_images(n_ood), unlabelled)}, kind="ood")
    write_arrays(paths["big"], {"test": (noise_images(n_ood, (16, 16, 1), seed=2), unlabelled)}, kind="ood")
    write_arrays(paths["rgb"], {"test": (noise_images(n_ood, (8, 8, 3), seed=3), unlabelled)}, kind="ood")
    paths["model"] = os.path.join(root, "model.keras")
    trained_digits_model().save(paths["model"])
    return paths
