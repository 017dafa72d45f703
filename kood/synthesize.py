"""A small class-conditional generator for SIO, for users without a GAN/diffusion model.

Trains a class-conditional generative model on a real kood dataset and writes
labelled synthetic images (kind=synthetic, same image shape, classes and
class_names). Two models, both CPU-feasible at 8x8..32x32:

- `gmm` (default): per class, a Gaussian mixture with full covariances in the
  PCA space of the real pixels (a mixture of probabilistic-PCA-like models).
  Fits in seconds and, at these sizes, gives sharper, more class-typical samples
  per second of CPU than the VAE.
- `vae`: a class-conditional VAE (MLP encoder/decoder, Bernoulli pixel
  likelihood) trained for `epochs`; samples are the decoder means.

Quality recorded in the manifest `extra["quality"]` (see `quality`): the
accuracy of a logistic regression trained on real pixels when applied to the
synthetic images (with its real held-out accuracy and chance for reference), and
a Frechet distance on PCA features of the pixels, synthetic-vs-real next to
real-vs-real (same sample sizes).

Example:
    synthesize("data/digits_id", "data/digits_syn", num_images=2000, model="gmm")
"""

from __future__ import annotations

import os
import sys

import numpy as np

from kood.errors import ConfigError, DataError
from kood.manifest import Manifest, read_manifest
from kood.progress import Progress

MODELS = ("gmm", "vae")
# Samples for the quality figures; more adds seconds without changing the figures much.
_QUALITY_MAX_REAL = 6000
_PCA_MAX_FIT = 10000
_PCA_MAX_DIMS = 128
# Samples are turned into uint8 in chunks so float copies of a large set never exist at once.
_SAMPLE_CHUNK = 10000


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def read_split(directory: str, split: str | None = None) -> tuple[Manifest, np.ndarray, np.ndarray]:
    """Reads one split of a kood dataset fully into memory.

    Args:
        directory: kood dataset directory.
        split: split name; None means `train` if present, else the first split.

    Returns:
        `(manifest, images uint8 [N, H, W, C], labels int64 [N])`.

    Example:
        manifest, images, labels = read_split("data/digits_id", "train")
    """
    import tensorflow as tf

    from kood.records import parse_example

    manifest = read_manifest(directory)
    if split is None:
        split = "train" if "train" in manifest.splits else next(iter(manifest.splits))
    paths = manifest.shard_paths(directory, split)
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"{path}: shard listed in {directory}/manifest.json is missing")
    shape, encoding = manifest.shape, manifest.encoding
    ds = tf.data.TFRecordDataset(paths).map(lambda s: parse_example(s, shape, encoding)).batch(1024)
    images, labels = [], []
    try:
        for batch in ds:
            images.append(batch["image"].numpy())
            labels.append(batch["label"].numpy())
    except tf.errors.OpError as e:
        raise DataError(f"{directory}: cannot read split {split!r}: {e.message}") from e
    return manifest, np.concatenate(images), np.concatenate(labels).astype(np.int64)


def class_counts(num_images: int, num_classes: int) -> list[int]:
    """Splits `num_images` evenly over classes (the first `num_images % K` get one more)."""
    base, rest = divmod(num_images, num_classes)
    return [base + (1 if c < rest else 0) for c in range(num_classes)]


class _PcaGmm:
    """Per-class Gaussian mixtures in a shared PCA space of the pixels."""

    def __init__(self, num_classes: int, components: int = 4, variance: float = 0.95, seed: int = 0):
        self.num_classes, self.components, self.variance, self.seed = num_classes, components, variance, seed

    def fit(self, x: np.ndarray, labels: np.ndarray) -> "_PcaGmm":
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        # The PCA basis is fitted on a subsample: 10k images pin down the top
        # components, and a full SVD of e.g. 50k x 3072 pixels costs minutes and GBs.
        rng = np.random.default_rng(self.seed)
        fit_rows = x[np.sort(rng.permutation(len(x))[:_PCA_MAX_FIT])]
        dims = min(len(fit_rows) - 1, x.shape[1], _PCA_MAX_DIMS)
        solver = "full" if x.shape[1] <= 512 else "randomized"
        self.pca = PCA(n_components=dims, svd_solver=solver, random_state=self.seed).fit(fit_rows)
        # Keep the components that explain `variance` of the pixels: the rest is
        # mostly per-image noise that would only blur the class models.
        keep = int(np.searchsorted(np.cumsum(self.pca.explained_variance_ratio_), self.variance) + 1)
        keep = max(2, min(keep, self.pca.n_components_))
        z = self.pca.transform(x)[:, :keep].astype(np.float64)  # GMM covariances need float64
        self.keep = keep
        self.mixtures = []
        with Progress("fit gmm", total=self.num_classes, unit="class") as bar:
            for c in range(self.num_classes):
                zc = z[labels == c]
                # Each component needs clearly more samples than dimensions for a full covariance.
                k = max(1, min(self.components, len(zc) // (2 * keep)))
                self.mixtures.append(GaussianMixture(k, covariance_type="full", reg_covar=1e-4,
                                                     random_state=self.seed + c).fit(zc))
                bar.update(1)
        return self

    def sample(self, counts: list[int]) -> np.ndarray:
        out = []
        for c, n in enumerate(counts):
            if n == 0:
                continue
            z, _ = self.mixtures[c].sample(n)
            for i in range(0, n, _SAMPLE_CHUNK):
                full = np.zeros((len(z[i:i + _SAMPLE_CHUNK]), self.pca.n_components_), np.float32)
                full[:, :self.keep] = z[i:i + _SAMPLE_CHUNK]
                out.append(_to_uint8(self.pca.inverse_transform(full)))
        return np.concatenate(out)


class _Cvae:
    """Class-conditional VAE with MLP encoder/decoder on flattened pixels in [0, 1]."""

    def __init__(self, num_classes: int, epochs: int = 30, latent: int = 16, hidden: int = 256,
                 batch_size: int = 64, seed: int = 0):
        self.num_classes, self.epochs, self.latent, self.hidden = num_classes, epochs, latent, hidden
        self.batch_size, self.seed = batch_size, seed

    def fit(self, x: np.ndarray, labels: np.ndarray) -> "_Cvae":
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(self.seed)
        dim, k, lat = x.shape[1], self.num_classes, self.latent
        self.encoder = keras.Sequential([keras.Input((dim + k,)), keras.layers.Dense(self.hidden, "relu"),
                                         keras.layers.Dense(self.hidden, "relu"), keras.layers.Dense(2 * lat)])
        self.decoder = keras.Sequential([keras.Input((lat + k,)), keras.layers.Dense(self.hidden, "relu"),
                                         keras.layers.Dense(self.hidden, "relu"), keras.layers.Dense(dim)])
        weights = self.encoder.trainable_weights + self.decoder.trainable_weights
        optimizer = keras.optimizers.Adam(1e-3)

        @tf.function
        def step(xb, yb, eps):
            with tf.GradientTape() as tape:
                mu, logvar = tf.split(self.encoder(tf.concat([xb, yb], 1)), 2, axis=1)
                z = mu + tf.exp(0.5 * logvar) * eps
                logits = self.decoder(tf.concat([z, yb], 1))
                rec = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=xb, logits=logits), 1)
                kl = -0.5 * tf.reduce_sum(1 + logvar - mu ** 2 - tf.exp(logvar), 1)
                loss = tf.reduce_mean(rec + kl)
            optimizer.apply(tape.gradient(loss, weights), weights)
            return loss

        rng = np.random.default_rng(self.seed)
        onehot = np.eye(k, dtype=np.float32)[labels]
        x = x.astype(np.float32)
        with Progress("train vae", total=self.epochs, unit="epoch") as bar:
            for _ in range(self.epochs):
                order = rng.permutation(len(x))
                for i in range(0, len(x), self.batch_size):
                    idx = order[i:i + self.batch_size]
                    eps = rng.standard_normal((len(idx), lat)).astype(np.float32)
                    self.loss = float(step(x[idx], onehot[idx], eps))
                bar.update(1)
        return self

    def sample(self, counts: list[int]) -> np.ndarray:
        import tensorflow as tf

        rng = np.random.default_rng(self.seed + 1)
        labels = np.repeat(np.arange(self.num_classes), counts)
        out = []
        for i in range(0, len(labels), _SAMPLE_CHUNK):
            y = np.eye(self.num_classes, dtype=np.float32)[labels[i:i + _SAMPLE_CHUNK]]
            z = rng.standard_normal((len(y), self.latent)).astype(np.float32)
            out.append(_to_uint8(tf.sigmoid(self.decoder(np.concatenate([z, y], 1), training=False)).numpy()))
        return np.concatenate(out)


def generate(images: np.ndarray, labels: np.ndarray, num_classes: int, num_images: int, *,
             model: str = "gmm", epochs: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fits a class-conditional generator on real images and samples a class-balanced set.

    Args:
        images: real uint8 images `[N, H, W, C]`.
        labels: their labels in `[0, num_classes)`.
        num_classes: number of classes; every class needs at least 2 real images.
        num_images: how many images to sample, spread evenly over classes (`class_counts`).
        model: `gmm` or `vae` (see module docstring).
        epochs: VAE training epochs (ignored by `gmm`).
        seed: makes the output deterministic.

    Returns:
        `(images uint8 [num_images, H, W, C], labels int64 [num_images])`, shuffled.

    Example:
        syn_x, syn_y = generate(x, y, 10, 1000, model="gmm")
    """
    if model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}. Received: model={model!r}")
    if num_images < 1:
        raise ConfigError(f"num_images must be >= 1. Received: num_images={num_images}")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1. Received: epochs={epochs}")
    per_class = np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]
    if (per_class < 2).any() or (labels >= num_classes).any() or (labels < 0).any():
        raise DataError(f"every real image needs a label in [0, {num_classes}) and every class at least 2 "
                        f"images to fit a generator. Received: per-class counts {per_class.tolist()}, "
                        f"label range [{labels.min()}, {labels.max()}]")
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    if model == "gmm":
        gen = _PcaGmm(num_classes, seed=seed).fit(x, labels)
    else:
        gen = _Cvae(num_classes, epochs=epochs, seed=seed).fit(x, labels)
    counts = class_counts(num_images, num_classes)
    syn = gen.sample(counts).reshape((num_images,) + images.shape[1:])
    syn_labels = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
    order = np.random.default_rng(seed).permutation(num_images)
    return syn[order], syn_labels[order]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows `a` and `b`."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean))


def quality(real_images: np.ndarray, real_labels: np.ndarray, syn_images: np.ndarray,
            syn_labels: np.ndarray, num_classes: int, *, seed: int = 0) -> dict:
    """Quality figures of a synthetic set against the real set it imitates.

    Both sets are randomly subsampled to at most 6000 images (bounded time and
    memory). A logistic regression is trained on 80% of the real images (pixels) and
    evaluated on the other 20% (reference) and on the synthetic images. PCA
    (16 dims) is fitted on real pixels; the Frechet distance between real half
    A and the synthetic images is reported next to real half A vs real half B,
    with the same number of samples on the compared side.

    Args:
        real_images, real_labels: the real set (uint8 images, labels in range).
        syn_images, syn_labels: the synthetic set.
        num_classes: number of classes (for the chance level).
        seed: subsampling/split seed.

    Returns:
        dict with `real_classifier_accuracy_on_synthetic`, `real_classifier_accuracy_on_real_heldout`,
        `chance_accuracy`, `frechet_pca`, `frechet_pca_real_vs_real`, `frechet_pca_dims`, `frechet_samples`.

    Example:
        q = quality(x, y, syn_x, syn_y, 10)
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real_images))[:_QUALITY_MAX_REAL]
    real = real_images[order].reshape(len(order), -1).astype(np.float64) / 255.0
    real_y = real_labels[order]
    syn_order = rng.permutation(len(syn_images))[:_QUALITY_MAX_REAL]
    syn = syn_images[syn_order].reshape(len(syn_order), -1).astype(np.float64) / 255.0
    syn_labels = syn_labels[syn_order]
    cut = int(0.8 * len(real))
    clf = LogisticRegression(max_iter=500).fit(real[:cut], real_y[:cut])
    dims = int(min(16, real.shape[1], len(real) // 4))
    pca = PCA(dims, svd_solver="full", random_state=seed).fit(real)
    half = len(real) // 2
    n = min(len(real) - half, len(syn))
    feats_a, feats_b = pca.transform(real[:half]), pca.transform(real[half:half + n])
    feats_syn = pca.transform(syn[:n])  # already a random subsample
    return {
        "real_classifier_accuracy_on_synthetic": float(clf.score(syn, syn_labels)),
        "real_classifier_accuracy_on_real_heldout": float(clf.score(real[cut:], real_y[cut:])),
        "chance_accuracy": 1.0 / num_classes,
        "frechet_pca": frechet_distance(feats_a, feats_syn),
        "frechet_pca_real_vs_real": frechet_distance(feats_a, feats_b),
        "frechet_pca_dims": dims,
        "frechet_samples": int(n),
    }


def synthesize(real_dir: str, out_dir: str, num_images: int, *, model: str = "gmm", epochs: int = 30,
               seed: int = 0, split: str | None = None, num_shards: int = 1, overwrite: bool = False,
               command: str | None = None) -> Manifest:
    """Trains a generator on a real kood dataset and writes a synthetic one (split `train`).

    Args:
        real_dir: real kood dataset dir with labels (num_classes > 0).
        out_dir: output dataset dir (kind=synthetic, same shape/classes/class_names).
        num_images: number of synthetic images (>= 1), class-balanced.
        model: `gmm` (default) or `vae`.
        epochs: VAE epochs.
        seed: makes the output deterministic.
        split: real split to learn from; None = `train` if present, else the first.
        num_shards: output shards.
        overwrite: replace an existing complete dataset at `out_dir`.
        command: recorded in the manifest (default: this process's command line).

    Returns:
        The written manifest; `extra` holds the model settings and `quality`.

    Example:
        synthesize("data/cifar10", "data/cifar10_syn", 50000, model="gmm")
    """
    from kood.writer import DatasetWriter, check_out_dir

    if num_images < 1:
        raise ConfigError(f"num_images must be >= 1. Received: num_images={num_images}")
    if model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}. Received: model={model!r}")
    check_out_dir(out_dir, overwrite)  # before fitting the generator, which can take minutes
    manifest = read_manifest(real_dir)
    if manifest.num_classes == 0:
        raise DataError(f"{real_dir}: has no labels (num_classes=0, kind={manifest.kind}); "
                        f"a class-conditional generator needs a labelled real set")
    empty = [n for n, c in zip(manifest.class_names, class_counts(num_images, manifest.num_classes)) if c == 0]
    if empty:  # before fitting, like the warning data_prep.synthetic --pseudo_label_model prints after labelling
        print(f"warning: no image is generated for class(es) {empty} ({len(empty)} of {manifest.num_classes}): "
              f"--num_images={num_images} is less than the {manifest.num_classes} classes; pass --num_images >= "
              f"{manifest.num_classes}", file=sys.stderr)
    _, images, labels = read_split(real_dir, split)
    syn, syn_labels = generate(images, labels, manifest.num_classes, num_images, model=model,
                               epochs=epochs, seed=seed)
    extra = {"generator": model, "epochs": epochs if model == "vae" else None, "seed": seed,
             "real_dir": os.path.abspath(real_dir), "real_images": int(len(images)),
             "quality": quality(images, labels, syn, syn_labels, manifest.num_classes, seed=seed)}
    w = DatasetWriter(out_dir, kind="synthetic", image_shape=manifest.shape, num_classes=manifest.num_classes,
                      class_names=manifest.class_names, encoding=manifest.encoding, overwrite=overwrite)
    w.write_split("train", ((syn[i], int(syn_labels[i]), i) for i in range(num_images)),
                  num_shards=num_shards, total=num_images)
    return w.finish(source=f"kood.synthesize:{model}:{os.path.abspath(real_dir)}", command=command, extra=extra)
