"""The detector interface and the small numpy helpers the detectors share.

A detector scores images, higher = more OOD:

    det = DETECTORS["knn"](model, k=50)     # any kood classifier (layers normalize/features/classifier)
    det.fit(id_train_dataset)               # only detectors with `needs_fit`; batches of (images, labels)
    scores = det.score(images)              # np.ndarray [B]

Most detectors are a pure function of the classifier's logits and penultimate features; they
implement `score_outputs(outputs)` (and `fit_outputs`), so `kood.evaluate` can run the network once
per data set and share its outputs between detectors. Detectors that need the input (ODIN) override
`score(images)` and set `uses_outputs = False`.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf
from scipy.special import logsumexp, softmax

from kood.errors import ConfigError
from kood.models import outputs_model
from kood.progress import Progress


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy score -T * logsumexp(logits / T) per row (higher = more OOD)."""
    check_positive("energy", "temperature", temperature)
    return -temperature * logsumexp(np.asarray(logits, np.float64) / temperature, axis=1)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(logits / T) in float64."""
    check_positive("softmax", "temperature", temperature)
    return softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def check_positive(detector: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
        raise ConfigError(f"{detector}: `{name}` must be a number > 0. Received: {name}={value!r}")


def check_percentile(detector: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value < 100:
        raise ConfigError(f"{detector}: `{name}` must be a percentile in [0, 100). Received: {name}={value!r}")


_FORWARD: "weakref.WeakKeyDictionary[keras.Model, Callable]" = weakref.WeakKeyDictionary()


def forward_fn(model: keras.Model) -> Callable:
    """A compiled `images -> {"logits", "features"}` for `model`, built once per model (tracing is slow)."""
    if model not in _FORWARD:
        net = outputs_model(model)  # ConfigError if model is not a kood classifier
        _FORWARD[model] = tf.function(lambda x: net(x, training=False), reduce_retracing=True)
    return _FORWARD[model]


def model_images(model: keras.Model, images, who: str) -> tf.Tensor:
    """`images` as a float32 tensor; a ConfigError naming `who` unless it is a batch of the model's input
    shape (else Keras fails deep inside the tf.function with a message that names neither).

    Example:
        model_images(model, np.zeros((2, 28, 28)), "energy")
        # ConfigError: energy expects images of shape (28, 28, 1) (...). Received: shape (2, 28, 28)
    """
    x = tf.convert_to_tensor(images)
    if x.dtype != tf.float32:  # uint8 pixels as tfds and kood's exports take them, float64 numpy arrays
        x = tf.cast(x, tf.float32)
    expected = tuple(model.input_shape[1:])
    got = tuple(x.shape)
    if len(got) != len(expected) + 1 or any(e is not None and e != g for e, g in zip(expected, got[1:])):
        raise ConfigError(f"{who} expects images of shape {expected} (the input of model {model.name!r}), in "
                          f"batches [B, {', '.join(map(str, expected))}]. Received: shape {got}")
    return x


def _batch_parts(batch) -> tuple[tf.Tensor, tf.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _as_batches(data) -> Iterable:
    """`data` as batches: arrays `images` [N, H, W, C] or `(images, labels [N])` are cut into batches."""
    def is_array(a, rank):
        return isinstance(a, (np.ndarray, tf.Tensor)) and len(a.shape) == rank

    if is_array(data, 4) or (isinstance(data, tuple) and len(data) == 2 and is_array(data[0], 4)
                             and is_array(data[1], 1)):
        return tf.data.Dataset.from_tensor_slices(data).batch(256)
    return data


def collect_outputs(model: keras.Model, dataset: Iterable, desc: str = "outputs") -> dict[str, np.ndarray]:
    """Runs the classifier over `dataset` once: {"logits" [N,K], "features" [N,D], "labels" [N] or absent}.

    Args:
        model: a kood classifier.
        dataset: batches of `(images, labels)` or of images (e.g. `kood.data.eval_dataset`), or arrays
            as `keras.Model.fit` takes them: `(images, labels)` or `images`, cut into batches of 256.
        desc: label of the progress line.

    Example:
        out = collect_outputs(model, eval_dataset("data/cifar10", "test"))
    """
    forward = forward_fn(model)
    logits, features, labels = [], [], []
    with Progress(desc) as bar:
        for batch in _as_batches(dataset):
            images, y = _batch_parts(batch)
            out = forward(model_images(model, images, desc))
            logits.append(out["logits"].numpy())
            features.append(out["features"].numpy())
            if y is not None:
                labels.append(np.asarray(y))
            bar.update(int(images.shape[0]))
    if not logits:
        raise ConfigError(f"{desc}: the dataset yielded no batches")
    result = {"logits": np.concatenate(logits), "features": np.concatenate(features)}
    if labels:
        result["labels"] = np.concatenate(labels).astype(np.int64)
    return result


class Detector:
    """Base class: `Detector(model, **hyperparams)`, `fit(dataset)`, `score(images) -> np.ndarray`.

    Subclasses set `name`, `needs_fit` / `needs_labels`, and implement `score_outputs` (and
    `fit_outputs` when they need ID data).
    """

    name = "detector"
    needs_fit = False       # fit() on ID training data is required before score()
    needs_labels = False    # fit data must be labelled
    uses_outputs = True     # the score is a function of {"logits", "features"} only

    def __init__(self, model: keras.Model):
        self.model = model
        self._forward = forward_fn(model)
        dense = model.get_layer("classifier")
        self.weight, self.bias = (np.asarray(w, np.float64) for w in dense.get_weights())  # W [D, K], b [K]
        self.fitted = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hyperparams()})"

    def hyperparams(self) -> dict:
        """The detector's hyperparameters (for result files)."""
        return {}

    def fit(self, dataset: Iterable | None) -> "Detector":
        """Fits on ID data (batches of `(images, labels)`); a no-op for detectors without `needs_fit`."""
        if not self.needs_fit:
            return self
        if dataset is None:
            raise ConfigError(f"{self.name} needs ID fit data (its training split): call fit(dataset) with "
                              "ID images (kood.evaluate: --fit_data). Received: dataset=None")
        return self.fit_outputs(collect_outputs(self.model, dataset, desc=f"fit {self.name}"))

    def fit_outputs(self, outputs: dict[str, np.ndarray]) -> "Detector":
        """Fits from precomputed ID outputs {"logits", "features"[, "labels"]}."""
        if self.needs_labels and "labels" not in outputs:
            raise ConfigError(f"{self.name} needs labelled ID fit data (class-conditional statistics); "
                              "the fit dataset yielded images without labels")
        self._fit(outputs)
        self.fitted = True
        return self

    def _fit(self, outputs: dict[str, np.ndarray]) -> None:
        pass

    def _check_fitted(self) -> None:
        if self.needs_fit and not self.fitted:
            raise ConfigError(f"{self.name} needs ID fit data: call fit(dataset) (or fit_outputs) before "
                              "score() (kood.evaluate: --fit_data)")

    def score(self, images) -> np.ndarray:
        """OOD scores of a batch of pixel images `[B, H, W, C]` (float32; uint8 is cast) (or of every image of a
        `tf.data.Dataset` of such batches, or of `(images, labels)` batches); higher = more OOD."""
        self._check_fitted()
        if isinstance(images, tf.data.Dataset):
            scores = [self._score_batch(_batch_parts(batch)[0]) for batch in images]
            if not scores:
                raise ConfigError(f"{self.name}: the dataset to score yielded no batches")
            return np.concatenate(scores)
        return self._score_batch(images)

    def _score_batch(self, images) -> np.ndarray:
        out = self._forward(model_images(self.model, images, self.name))
        return self.score_outputs({k: v.numpy() for k, v in out.items()})

    def score_outputs(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """OOD scores from precomputed {"logits", "features"}."""
        raise NotImplementedError(f"{type(self).__name__} scores images only; call score(images)")
