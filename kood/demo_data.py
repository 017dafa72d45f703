"""The embedded demo data set, built offline in seconds from scikit-learn's digits.

`load_digits` ships with scikit-learn (1797 8x8 grayscale digits, values 0..16),
so the demo needs no download. Values are scaled to uint8 0..255 and images are
upsampled to 16x16 (bilinear): the training pipeline pads by 4 pixels and
random-crops, which on 8x8 images would shift away half the digit, and the
CIFAR-style architectures downsample 2-3 times, leaving 1x1 maps at 8x8.

Roles (disjoint digit classes, so the aux and OOD sets are truly
out-of-distribution and the test OOD classes are never seen in training, as in
the papers where the auxiliary set differs from the test OOD sets):

- `id`  (kind=real): digits 0-5, 6 classes named "0".."5", splits `train`
  (80%, stratified) and `test` (20%).
- `aux` (kind=outlier): digits 6-7, labels -1, split `train`.
- `ood` (kind=ood): digits 8-9, labels -1, split `test`.
- `syn` (kind=synthetic): 2000 class-balanced images of digits 0-5 from
  `kood.synthesize` (Gaussian mixtures in PCA space) fitted on `id/train`.

The output is deterministic for a given seed (byte-identical shards).

Example:
    dirs = build_demo("/tmp/kood_demo")  # {"id": ..., "aux": ..., "ood": ..., "syn": ...}
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from kood.errors import ConfigError, DataError
from kood.manifest import MANIFEST

ID_CLASSES = (0, 1, 2, 3, 4, 5)
AUX_CLASSES = (6, 7)
OOD_CLASSES = (8, 9)
ROLES = ("id", "aux", "ood", "syn")
NUM_SYNTHETIC = 2000
TEST_FRACTION = 0.2
SOURCE = "sklearn.datasets.load_digits"


def digits_images(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as uint8 `[N, S, S, 1]` images (0..255) and int64 labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if image_size == 8:
        images = small
    else:
        images = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
                           for im in small])
    return images[..., None], digits.target.astype(np.int64)


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(len(idx) * fraction))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def build_demo(out: str, *, seed: int = 0, overwrite: bool = False, image_size: int = 16,
               num_synthetic: int = NUM_SYNTHETIC) -> dict[str, str]:
    """Builds the demo datasets under `out` (see module docstring) and returns role -> dir.

    Everything is built in a staging directory `out/.building` and moved into
    place at the end, so an interrupted build never leaves some roles complete.

    Args:
        out: root directory; datasets go to `out/id`, `out/aux`, `out/ood`, `out/syn`.
        seed: split and generator seed (same seed, same bytes).
        overwrite: replace existing demo datasets; otherwise an existing one is a DataError.
        image_size: side of the square images, 8 (native) or larger (upsampled).
        num_synthetic: number of synthetic ID images.

    Returns:
        `{"id": dir, "aux": dir, "ood": dir, "syn": dir}`.

    Example:
        dirs = build_demo("/tmp/kood_demo", seed=0)
    """
    from kood.synthesize import synthesize
    from kood.errors import check_output_dir
    from kood.writer import write_arrays

    if image_size < 8:
        raise ConfigError(f"image_size must be >= 8. Received: image_size={image_size}")
    if num_synthetic < 1:
        raise ConfigError(f"num_synthetic must be >= 1. Received: num_synthetic={num_synthetic}")
    check_output_dir(out, "--out")
    dirs = {role: os.path.join(out, role) for role in ROLES}
    for role, d in dirs.items():
        if os.path.exists(d):
            if not overwrite and os.path.exists(os.path.join(d, MANIFEST)):
                raise DataError(f"{d}: already holds a demo dataset; pass --overwrite to rebuild it")
            if os.listdir(d) and not os.path.exists(os.path.join(d, MANIFEST)) and not _only_shards(d):
                raise DataError(f"{d}: exists and is not a kood dataset; refusing to replace it")

    images, labels = digits_images(image_size)
    rng = np.random.default_rng(seed)
    stage = os.path.join(out, ".building")
    if os.path.exists(stage):
        shutil.rmtree(stage)  # left over from an interrupted build
    staged = {role: os.path.join(stage, role) for role in ROLES}
    command = f"kood.demo_data.build_demo(seed={seed}, image_size={image_size}, num_synthetic={num_synthetic})"

    id_idx = np.flatnonzero(np.isin(labels, ID_CLASSES))
    train, test = _stratified_split(labels[id_idx], TEST_FRACTION, rng)
    train, test = id_idx[train], id_idx[test]
    names = [str(c) for c in ID_CLASSES]
    common = dict(source=SOURCE, show_progress=False)
    write_arrays(staged["id"], {"train": (images[train], labels[train]), "test": (images[test], labels[test])},
                 kind="real", class_names=names, extra={"classes": list(ID_CLASSES), "seed": seed}, **common)
    for role, classes, kind, split in (("aux", AUX_CLASSES, "outlier", "train"), ("ood", OOD_CLASSES, "ood", "test")):
        idx = np.flatnonzero(np.isin(labels, classes))
        write_arrays(staged[role], {split: (images[idx], np.full(len(idx), -1, np.int64))}, kind=kind,
                     num_classes=0, extra={"classes": list(classes)}, **common)
    synthesize(staged["id"], staged["syn"], num_synthetic, model="gmm", seed=seed, command=command)
    _fix_commands(staged, command)

    for role in ROLES:
        if os.path.exists(dirs[role]):
            shutil.rmtree(dirs[role])
        os.replace(staged[role], dirs[role])
    os.rmdir(stage)
    return dirs


def _only_shards(d: str) -> bool:
    """True for a directory an interrupted kood writer left (shards, temp files, no manifest)."""
    return all(n.endswith((".tfrecord", ".tmp")) for n in os.listdir(d))


def _fix_commands(staged: dict[str, str], command: str) -> None:
    """Records the demo build (not the test runner's argv) as the command and drops the staging path."""
    from kood.manifest import read_manifest, write_manifest

    for d in staged.values():
        m = read_manifest(d)
        m.command = command
        if "real_dir" in m.extra:
            m.extra["real_dir"] = "../id"
        m.source = m.source.replace(os.path.abspath(staged["id"]), "../id")
        write_manifest(d, m)
