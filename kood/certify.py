"""Certified OOD-detection radius from the score's input gradient (GReg paper, section 5, eq. 4).

With the energy score S and the threshold gamma at 95% ID TPR (x is accepted as ID when
S(x) <= gamma), a sample x whose score is L-Lipschitz on a ball around it keeps its decision for
every x' with ||x' - x|| <= eps*:
    ID correctly accepted:   eps* = (gamma - S(x)) / L
    OOD correctly rejected:  eps* = (S(x) - gamma) / L
kood uses L = ||grad_x S(x)||_2 at x: a FIRST-ORDER PROXY for the local Lipschitz constant (exact only
inside the linear region of a ReLU network, paper section 5), so the radius is an estimate, not a
guarantee. Optionally `lipschitz_samples > 0` takes the max gradient norm over x and that many random
points of the ball of radius `lipschitz_radius` around x (a sampled lower bound of the local Lipschitz
constant on that ball; larger than the proxy, so smaller, more cautious radii).

The gradient norm is measured w.r.t. the normalized input (the `normalize` layer's output, as the
GReg penalty is; `space="normalized"`) or w.r.t. 0..255 pixels (`space="pixels"`); radii are in the
same space.

Example:
    out = certify(model, eval_dataset(id_dir), {"svhn": eval_dataset(svhn_dir)})
    out["id"]["median_radius"], out["ood"]["svhn"]["median_radius"]
"""

from __future__ import annotations

from typing import Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf

from kood.errors import ConfigError
from kood.metrics import threshold_at_tpr
from kood.progress import Progress

SPACES = ("normalized", "pixels")
NOTE = ("L = ||grad_x S(x)||_2 at x, a first-order proxy for the local Lipschitz constant (GReg eq. 4): "
        "the radii are estimates, not guarantees")


class ScoreGradient:
    """Energy scores and per-sample input-gradient norms of a kood classifier.

    The gradient is always taken w.r.t. pixels through the whole model; for `space="normalized"`
    it is scaled by the `normalize` layer's std (x_norm = (x - mean) / std, so dS/dx_norm = std * dS/dx),
    which equals differentiating w.r.t. the normalized input.

    Args:
        model: a kood classifier (layers normalize/features/classifier).
        temperature: energy temperature T.
        space: `"normalized"` (default, as the GReg penalty) or `"pixels"`.

    Example:
        scores, norms = ScoreGradient(model)(images)
    """

    def __init__(self, model: keras.Model, temperature: float = 1.0, space: str = "normalized"):
        if space not in SPACES:
            raise ConfigError(f"`space` must be one of {SPACES}. Received: space={space!r}")
        if not temperature > 0:
            raise ConfigError(f"`temperature` must be > 0. Received: temperature={temperature!r}")
        self.space, self.temperature, self.model = space, float(temperature), model
        norm = model.get_layer("normalize")
        std = np.sqrt(np.maximum(np.asarray(norm.variance, np.float32), keras.backend.epsilon()))
        self.std = std.reshape(-1) if space == "normalized" else np.ones_like(std.reshape(-1))
        self._grad = tf.function(self._score_and_norm, reduce_retracing=True)

    def _score_and_norm(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = self.model(x, training=False)
            s = -self.temperature * tf.reduce_logsumexp(logits / self.temperature, axis=1)
            # each sample's score depends only on its own input, so the gradient of the sum is per-sample
            total = tf.reduce_sum(s)
        g = tape.gradient(total, x) * self.std
        return s, tf.norm(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1)

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        s, n = self._grad(tf.convert_to_tensor(images, tf.float32))
        return s.numpy().astype(np.float64), n.numpy().astype(np.float64)

    def sampled_lipschitz(self, images, radius: float, num_samples: int, seed: int = 0) -> np.ndarray:
        """max ||grad S|| over x and `num_samples` uniform random points of the L2 ball B(x, radius)
        (`radius` in `space` units)."""
        x = np.asarray(images, np.float32)
        _, best = self(x)
        rng = np.random.default_rng(seed)
        dim = int(np.prod(x.shape[1:]))
        for _ in range(num_samples):
            d = rng.standard_normal(x.shape).astype(np.float32)
            d /= np.linalg.norm(d.reshape(len(d), -1), axis=1).reshape(-1, *[1] * (x.ndim - 1))
            r = radius * rng.uniform(size=(len(d),) + (1,) * (x.ndim - 1)) ** (1.0 / dim)
            _, n = self(x + (d * r * self.std).astype(np.float32))  # a normalized-space step, in pixels
            best = np.maximum(best, n)
        return best


def certified_radius(scores, grad_norms, gamma: float, is_id: bool) -> np.ndarray:
    """eps* per sample: (gamma - S)/L for ID, (S - gamma)/L for OOD; NaN where the decision is wrong.

    Example:
        certified_radius([-5.0], [2.0], gamma=-3.0, is_id=True)   # [1.0]
    """
    s, l = np.asarray(scores, np.float64), np.asarray(grad_norms, np.float64)
    margin = gamma - s if is_id else s - gamma
    correct = margin >= 0 if is_id else margin > 0  # ID is accepted at S <= gamma
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(correct, margin / np.maximum(l, 1e-12), np.nan)


def _summary(radii: np.ndarray) -> dict:
    ok = radii[~np.isnan(radii)]
    return {"count": int(radii.size), "correct": int(ok.size),
            "median_radius": float(np.median(ok)) if ok.size else float("nan")}


def _scores_and_norms(grad: ScoreGradient, dataset: Iterable, desc: str, lipschitz_samples: int,
                      lipschitz_radius: float) -> tuple[np.ndarray, np.ndarray]:
    scores, norms = [], []
    with Progress(desc) as bar:
        for i, batch in enumerate(dataset):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            s, n = grad(images)
            if lipschitz_samples:
                n = grad.sampled_lipschitz(images, lipschitz_radius, lipschitz_samples, seed=i)
            scores.append(s)
            norms.append(n)
            bar.update(len(s))
    if not scores:
        raise ConfigError(f"{desc}: the dataset yielded no batches")
    return np.concatenate(scores), np.concatenate(norms)


def certify(model: keras.Model, id_dataset: Iterable, ood_datasets: Mapping[str, Iterable], *, tpr: float = 0.95,
            temperature: float = 1.0, space: str = "normalized", lipschitz_samples: int = 0,
            lipschitz_radius: float = 0.1) -> dict:
    """Median certified radius over correctly accepted ID and correctly rejected OOD samples.

    Args:
        model: a kood classifier.
        id_dataset: ID test batches `(images, labels)` or images; also sets gamma (threshold at `tpr`).
        ood_datasets: `{name: batches}`.
        tpr: ID true-positive rate of the threshold gamma.
        temperature: energy temperature.
        space: gradient space, `"normalized"` or `"pixels"`.
        lipschitz_samples: random ball points per sample for the sampled Lipschitz estimate (0 = off).
        lipschitz_radius: radius of that ball (in `space` units).

    Returns:
        `{"note", "space", "tpr", "gamma", "estimate", "id": {count, correct, median_radius},
        "ood": {name: {...}}}`.

    Example:
        certify(model, eval_dataset(id_dir), {"svhn": eval_dataset(svhn_dir)})["id"]["median_radius"]
    """
    if isinstance(lipschitz_samples, bool) or not isinstance(lipschitz_samples, int) or lipschitz_samples < 0:
        raise ConfigError(f"`lipschitz_samples` must be an integer >= 0. Received: lipschitz_samples={lipschitz_samples!r}")
    if lipschitz_samples and not lipschitz_radius > 0:
        raise ConfigError(f"`lipschitz_radius` must be > 0. Received: lipschitz_radius={lipschitz_radius!r}")
    grad = ScoreGradient(model, temperature, space)
    s_id, l_id = _scores_and_norms(grad, id_dataset, "certify id", lipschitz_samples, lipschitz_radius)
    gamma = threshold_at_tpr(s_id, tpr)
    note = NOTE if not lipschitz_samples else (
        "L = max ||grad_x S|| over x and random points of a ball around it: a sampled lower bound of the local "
        "Lipschitz constant on that ball (GReg eq. 4), so the radii are estimates, not guarantees")
    result = {"note": note, "space": space, "tpr": tpr, "gamma": gamma, "temperature": temperature,
              "estimate": (f"sampled max gradient norm over {lipschitz_samples} points in a ball of radius "
                           f"{lipschitz_radius}" if lipschitz_samples else "gradient norm at x"),
              "id": _summary(certified_radius(s_id, l_id, gamma, is_id=True)), "ood": {}}
    for name, ds in ood_datasets.items():
        s, l = _scores_and_norms(grad, ds, f"certify {name}", lipschitz_samples, lipschitz_radius)
        result["ood"][name] = _summary(certified_radius(s, l, gamma, is_id=False))
    return result
