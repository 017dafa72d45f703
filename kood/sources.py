"""Source readers: turn a `SRC` string into splits of uint8 images and labels.

SRC forms (see `open_source`):
- `tfds:NAME[:SPLIT]`  a TensorFlow Datasets builder (needs the data locally)
- `cifar:PATH`         python-pickle CIFAR-10 (data_batch_1..5, test_batch, batches.meta)
                       or CIFAR-100 (train, test, meta; fine labels)
- `folder:PATH`        class subfolders (labelled), a flat folder of images (unlabelled), or split
                       folders of class subfolders (`PATH/train/CLASS/*`, `PATH/test/CLASS/*`)
- `npz:PATH`           arrays in an .npz (`x`/`y`, `images`/`labels`, or `x_train`/`y_train`/...)
- `npy:PATH`           one unlabelled `[N, H, W(, C)]` uint8 array, memory-mapped (never loaded whole)
- `mat:PATH`           SVHN `*_32x32.mat` (X is 32x32x3xN, y in 1..10 with 10 meaning digit 0)

Every split is a `SplitSource`: a known `count` and `read(indices)` yielding
`(index, image, label)` for sorted source indices, one image at a time, so
memory does not grow with the source. Images are uint8 `[H, W, C]` as stored
(sizes may differ in a folder); labels are ints, `-1` when the source has none.

Example:
    src = open_source("cifar:/data/cifar-10-batches-py")
    for i, image, label in src.splits["train"].read([0, 5, 9]): ...
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from typing import Callable, Iterator, Sequence

import numpy as np

from kood.errors import ConfigError, DataError

FORMS = ("tfds", "cifar", "folder", "npz", "npy", "mat")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Folder names that mark the DIR/SPLIT/CLASS/image layout when the tree is mixed (see `_folder`).
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
# Folder metadata that operating systems write: skipped without a note, like hidden names (.DS_Store).
JUNK_FILES = ("thumbs.db", "desktop.ini")
UNLABELLED = -1
# Tried in order when --images_key/--labels_key are not given; a `_SPLIT` suffix gives one split each.
IMAGE_KEYS = ("x", "images", "X", "image", "data")
LABEL_KEYS = ("y", "labels", "Y", "label", "targets")


@dataclasses.dataclass
class SplitSource:
    """One split of a source.

    Attributes:
        count: number of images.
        read: `read(sorted_indices) -> iterator of (index, image uint8 [H,W,C], label int)`.
        describe: `describe(index) -> str` naming the image in errors (file, array row).
    """
    count: int
    read: Callable[[Sequence[int]], Iterator[tuple[int, np.ndarray, int]]]
    describe: Callable[[int], str]


@dataclasses.dataclass
class Source:
    """A parsed SRC: its splits, and class names (empty when unlabelled)."""
    spec: str
    splits: dict[str, SplitSource]
    class_names: list[str]
    # True when a split name came from the data (cifar train/test, tfds split, x_train...),
    # False when the source has a single unnamed split (then the caller names it).
    named_splits: bool = True
    # Things the user should know but that do not stop the conversion (files skipped); printed once
    # by the caller, since worker processes reopen the source.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def open_source(spec: str, *, images_key: str | None = None, labels_key: str | None = None) -> Source:
    """Parses `spec` (`FORM:ARG`) and opens the source.

    Args:
        spec: e.g. `cifar:/data/cifar-10-batches-py`, `npy:/data/300K_random_images.npy`, `tfds:mnist:test`.
        images_key: npz only, the array of images (default: the first of `IMAGE_KEYS` present).
        labels_key: npz only, the array of labels (default: the first of `LABEL_KEYS`; none = unlabelled).

    Returns:
        A `Source`.

    Example:
        src = open_source("npz:digits.npz", images_key="x", labels_key="y")
    """
    form, sep, arg = spec.partition(":")
    if not sep or form not in FORMS or not arg:
        raise ConfigError(f"--source must be FORM:ARG with FORM one of {FORMS} "
                          f"(e.g. cifar:/data/cifar-10-batches-py). Received: source={spec!r}")
    if (images_key or labels_key) and form != "npz":
        raise ConfigError(f"--images_key/--labels_key apply to npz: sources only. Received: source={spec!r}")
    if form == "tfds":
        return _tfds(spec, arg)
    path = os.path.expanduser(arg)
    if not os.path.exists(path):
        raise DataError(f"{path}: source path does not exist (from --source={spec})")
    opener = {"cifar": _cifar, "folder": _folder, "npz": _npz, "npy": _npy, "mat": _mat}[form]
    if form == "npz":
        return opener(spec, path, images_key, labels_key)
    return opener(spec, path)


# --- in-memory / memory-mapped arrays ------------------------------------------------------------

def _as_nhwc(images, where: str):
    """Checks a uint8 `[N,H,W]` or `[N,H,W,C]` array; returns a per-row fetcher that adds the channel axis."""
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 pixels 0..255. Received: dtype={images.dtype}")
    if images.ndim == 3:
        return lambda i: images[i][..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        return lambda i: images[i]
    raise DataError(f"{where}: images must be [N, H, W] or [N, H, W, C] with C in 1/3/4. "
                    f"Received: shape={images.shape}")


def _array_split(images, labels: np.ndarray | None, where: str, labels_key: str | None = None) -> SplitSource:
    fetch = _as_nhwc(images, where)
    n = len(images)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise DataError(f"{where}: {n} images but {len(labels)} labels")
        if not np.issubdtype(labels.dtype, np.integer):
            named = f" ({labels_key!r})" if labels_key else ""
            raise DataError(f"{where}: labels{named} must be integers. Received: dtype={labels.dtype}")

    def read(indices):
        for i in indices:
            # np.array copies one row out of a memmap, so the file page is not kept referenced
            yield int(i), np.array(fetch(int(i))), UNLABELLED if labels is None else int(labels[i])

    return SplitSource(n, read, lambda i: f"{where}[{i}]")


def _class_names_from_labels(labels: list[np.ndarray], where: str) -> list[str]:
    flat = np.concatenate([l.reshape(-1) for l in labels])
    if len(flat) and flat.min() < 0:
        bad = int(np.flatnonzero(flat < 0)[0])
        raise DataError(f"{where}: label {int(flat[bad])} at position {bad} is negative; labels must be 0..K-1")
    if not len(flat):
        return []
    present = np.unique(flat)
    num_classes = int(present[-1]) + 1
    if len(present) < num_classes:  # a class without images, like an empty class folder, shifts the label space
        # at most len(present) of the first len(present) + 5 ids have images, so this finds 5 missing ones (or all)
        missing = np.setdiff1d(np.arange(min(num_classes, len(present) + 5)), present)[:5].tolist()
        raise DataError(f"{where}: labels go up to {num_classes - 1} but {num_classes - len(present)} of the class "
                        f"ids 0..{num_classes - 1} have no images in any split (e.g. {missing}); class ids must be "
                        f"0..K-1 with every class present. Ids that are not 0..K-1 (e.g. 1..K): relabel, e.g. with "
                        f"numpy over all splits' labels together: classes, y = np.unique(y, return_inverse=True). "
                        f"A synthetic set, whose ids must be its ID set's: add images of the missing classes")
    return [str(i) for i in range(num_classes)]


def _npy(spec: str, path: str) -> Source:
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy array: {e}") from e
    if not isinstance(images, np.ndarray):  # np.load opens an .npz archive too
        raise DataError(f"{path}: is a .npz archive, not a .npy array; use --source=npz:{path}")
    return Source(spec, {"train": _array_split(images, None, path)}, [], named_splits=False)


def _npz(spec: str, path: str, images_key: str | None, labels_key: str | None) -> Source:
    try:
        data = np.load(path)
        keys = list(data.files)
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a readable .npz archive: {e}") from e
    for flag, key in (("images_key", images_key), ("labels_key", labels_key)):
        if key is not None and key not in keys:
            raise ConfigError(f"--{flag}={key!r} is not an array of {path}; it has {keys}")
    if images_key is None:
        images_key = next((k for k in IMAGE_KEYS if k in keys), None)
        if labels_key is None:
            labels_key = next((k for k in LABEL_KEYS if k in keys), None)

    def array(key: str) -> np.ndarray:
        try:
            return data[key]
        except ValueError as e:  # an object (pickled) array, e.g. labels holding strings and None
            raise DataError(f"{path}: array {key!r} is not a plain numeric array: {e}") from e

    if images_key is not None:  # split name -> (images, labels or None, labels key)
        splits = {"train": (array(images_key), array(labels_key) if labels_key else None, labels_key)}
        named = False
    else:  # x_train / y_train, x_test / y_test ...
        splits = {}
        for key in keys:
            m = re.fullmatch(r"(?:x|images|X)_(\w+)", key)
            if m:
                name = m.group(1)
                lab = next((f"{p}_{name}" for p in ("y", "labels", "Y") if f"{p}_{name}" in keys), None)
                splits[name] = (array(key), array(lab) if lab else None, lab)
        if not splits:
            raise DataError(f"{path}: no images array; pass --images_key (arrays: {keys})")
        named = True
    labelled = [s[1] is not None for s in splits.values()]
    if any(labelled) and not all(labelled):
        raise DataError(f"{path}: some splits have labels and some do not: {sorted(splits)}")
    # the splits first: they refuse labels that are not integers (NaN, strings) before the class count is taken
    out = {name: _array_split(x, y, f"{path}:{name}", y_key) for name, (x, y, y_key) in splits.items()}
    names = _class_names_from_labels([s[1] for s in splits.values()], path) if all(labelled) else []
    return Source(spec, out, names, named_splits=named)


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing CIFAR file")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not CIFAR
        raise DataError(f"{path}: not a readable CIFAR pickle: {e}") from e


def _cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if b"data" not in d or label_key not in d:
        raise DataError(f"{path}: CIFAR pickle without {label_key.decode()!r}/'data'; keys {sorted(d)}")
    data = np.asarray(d[b"data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be [N, 3072]. Received: shape={data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[label_key], np.int64)


def _cifar(spec: str, path: str) -> Source:
    if not os.path.isdir(path):
        raise DataError(f"{path}: cifar: needs the extracted python-pickle directory")
    if os.path.exists(os.path.join(path, "batches.meta")):  # CIFAR-10
        meta = _unpickle(os.path.join(path, "batches.meta"))
        names = [n.decode() for n in meta[b"label_names"]]
        batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = b"labels"
    elif os.path.exists(os.path.join(path, "meta")):  # CIFAR-100
        meta = _unpickle(os.path.join(path, "meta"))
        names = [n.decode() for n in meta[b"fine_label_names"]]
        batches, label_key = {"train": ["train"], "test": ["test"]}, b"fine_labels"
    else:
        raise DataError(f"{path}: neither batches.meta (CIFAR-10) nor meta (CIFAR-100) found")
    splits = {}
    for split, files in batches.items():
        parts = [_cifar_batch(os.path.join(path, f), label_key) for f in files]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise DataError(f"{path}: {split} labels must be in [0, {len(names)}). "
                            f"Received: min={y.min()}, max={y.max()}")
        splits[split] = _array_split(x, y, f"{path}:{split}")
    return Source(spec, splits, names)


def _mat(spec: str, path: str) -> Source:
    import scipy.io

    try:
        d = scipy.io.loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises several types for a bad file
        raise DataError(f"{path}: not a readable .mat file: {e}") from e
    if "X" not in d:
        raise DataError(f"{path}: no 'X' array (SVHN *_32x32.mat layout expected)")
    x = d["X"]
    if x.ndim != 4:
        raise DataError(f"{path}: X must be [H, W, C, N]. Received: shape={x.shape}")
    x = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    y = None
    if "y" in d:
        y = np.asarray(d["y"]).reshape(-1).astype(np.int64)
        if len(y) and (y.min() < 1 or y.max() > 10):
            raise DataError(f"{path}: SVHN labels must be in 1..10. Received: min={y.min()}, max={y.max()}")
        y = y % 10  # SVHN stores digit 0 as 10
    base = os.path.basename(path)
    m = re.match(r"(train|test|extra)_", base)
    split = m.group(1) if m else "train"
    return Source(spec, {split: _array_split(x, y, path)}, [str(i) for i in range(10)] if y is not None else [],
                  named_splits=bool(m))


# --- image folders --------------------------------------------------------------------------------

def load_image_file(path: str) -> np.ndarray:
    """Reads an image file as uint8 `[H, W, C]`: grayscale stays 1 channel, everything else RGB.

    The EXIF orientation is applied (pixels as viewers show them). Alpha is dropped, not
    composited (gray+alpha gives 1 channel, like gray). 16-bit grayscale keeps its high byte
    (`value >> 8`, as Pillow itself reads 16-bit RGB). 32-bit integer (`I`) and float (`F`)
    images are refused: their range is not fixed.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            file_format = im.format
            # cameras store JPEGs unrotated plus an EXIF orientation tag that viewers apply
            im = ImageOps.exif_transpose(im)
            arr = _image_to_uint8(im, file_format, path)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image: {e}") from e
    return arr[..., None] if arr.ndim == 2 else arr


def _image_to_uint8(im, file_format: str | None, path: str) -> np.ndarray:
    """`im`'s pixels as uint8 `[H, W]` (grayscale) or `[H, W, 3]`; see `load_image_file`."""
    mode = im.mode
    # PNG samples are at most 16 bits, so an `I` PNG (older Pillow's 16-bit gray) is 16-bit too
    if mode in ("I;16", "I;16L", "I;16B", "I;16N") or (mode == "I" and file_format == "PNG"):
        # convert("L") would clip at 255 instead of scaling
        return (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
    if mode in ("I", "F") or mode.startswith("I;"):
        raise DataError(f"{path}: image mode {mode!r} (32-bit integer, float or signed pixels) has no fixed "
                        f"range to map to 0..255; save it as an 8-bit or 16-bit image first")
    return np.asarray(im.convert("L" if mode in ("1", "L", "LA") else "RGB"), np.uint8)


def _scan(directory: str) -> tuple[list[str], list[str], list[str]]:
    """`(image paths, subfolder names, skipped paths)` of `directory`, each sorted.

    Hidden names (`.DS_Store`, macOS AppleDouble `._x.png`, `.git`) and `JUNK_FILES` are left out
    silently; the skipped paths are the other files: other extensions, broken links.
    """
    images, subdirs, skipped = [], [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or name.lower() in JUNK_FILES:
            continue
        if os.path.isdir(path):
            subdirs.append(name)
        elif name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
            images.append(path)
        else:
            skipped.append(path)
    return images, subdirs, skipped


def _is_split_dir(path: str) -> bool:
    """A split folder of a SPLIT/CLASS/image tree: class subfolders and no images of its own."""
    images, subdirs, _ = _scan(path)
    return bool(subdirs) and not images


def _folder_split(path: str, where: str) -> tuple[list[str], list[int], list[str], list[str]]:
    """`(files, labels, class names, skipped files)` of one folder: class subfolders (labelled) or flat images."""
    top, subdirs, skipped = _scan(path)
    if subdirs and top:
        raise DataError(f"{path}: has both class subfolders {subdirs[:5]} and loose images (e.g. {top[0]}); "
                        f"use one layout")
    if not subdirs:
        return top, [UNLABELLED] * len(top), [], skipped
    files, labels = [], []
    for label, name in enumerate(subdirs):
        class_dir = os.path.join(path, name)
        found, nested, other = _scan(class_dir)
        if nested:  # an error, not skipped: the class would silently lack those images
            raise DataError(f"{os.path.join(class_dir, nested[0])}: a folder inside the class folder {class_dir}; "
                            f"nested folders are not read (a class's images must be directly in its folder), so "
                            f"move its images up into {class_dir} or remove it")
        if not found:  # it would still be a class, with no images, and shift the label space
            raise DataError(f"{class_dir}: class folder has no images (extensions "
                            f"{IMAGE_EXTENSIONS}); every subfolder of {where} is a class, so remove it "
                            f"or add its images")
        files += found
        labels += [label] * len(found)
        skipped += other
    return files, labels, subdirs, skipped


def _skipped_note(path: str, skipped: list[str]) -> list[str]:
    if not skipped:
        return []
    return [f"{path}: skipped {len(skipped)} file(s) that are not images (extensions other than "
            f"{' '.join(IMAGE_EXTENSIONS)}, or broken links; e.g. {', '.join(skipped[:2])})"]


def _folder(spec: str, path: str) -> Source:
    """Class subfolders, a flat folder, or split folders of class subfolders (`train/cat/1.png`, `test/cat/...`)."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: folder: needs a directory")
    top, subdirs, skipped = _scan(path)
    if subdirs and not top and all(_is_split_dir(os.path.join(path, d)) for d in subdirs):
        # SPLIT/CLASS/image: one labelled split per subfolder, train first (it is written first)
        splits, names = {}, None
        for split in sorted(subdirs, key=lambda d: (d != "train", d)):
            where = os.path.join(path, split)
            files, labels, split_names, split_skipped = _folder_split(where, f"{where} (the {split} split)")
            if names is None:
                names, first = split_names, where
            elif split_names != names:
                raise DataError(f"{where}: class folders {split_names} differ from {first}'s {names} (missing: "
                                f"{sorted(set(names) - set(split_names))}, extra: "
                                f"{sorted(set(split_names) - set(names))}); every split needs the same classes")
            splits[split] = _files_split(files, labels)
            skipped += split_skipped
        return Source(spec, splits, names, notes=_skipped_note(path, skipped))
    split_dirs = [d for d in subdirs if d in SPLIT_NAMES and _is_split_dir(os.path.join(path, d))]
    if split_dirs and not top:
        # else the class layout is assumed and the error would be about a split folder, not the stray one
        stray = [d for d in subdirs if not _is_split_dir(os.path.join(path, d))]
        loose, classes, _ = _scan(os.path.join(path, stray[0]))
        if stray[0] in SPLIT_NAMES and classes and loose:  # a split folder with an image beside its classes
            raise DataError(f"{loose[0]}: an image directly in the split folder {os.path.join(path, stray[0])}, "
                            f"next to its class folders {classes[:5]}; move it into its class folder or remove it")
        raise DataError(f"{os.path.join(path, stray[0])}: not a split folder of class folders, but {path} has the "
                        f"split folders {split_dirs} (the DIR/SPLIT/CLASS/image layout), where every subfolder of "
                        f"{path} must be one; move or remove {stray}")
    files, labels, names, skipped = _folder_split(path, path)
    if not files:
        raise DataError(f"{path}: no images found (extensions {IMAGE_EXTENSIONS}); the dataset would be empty")
    notes = _skipped_note(path, skipped)
    if names and set(names) <= set(SPLIT_NAMES):  # DIR/train/*.png: read as classes, which is rarely meant
        notes.append(f"{path}: its folders {names} are read as classes (images directly inside them); for splits "
                     f"of labelled images use DIR/SPLIT/CLASS/image, for an unlabelled set convert each split "
                     f"folder on its own (e.g. --source=folder:{os.path.join(path, names[0])})")
    return Source(spec, {"train": _files_split(files, labels)}, names, named_splits=False, notes=notes)


def _files_split(files: list[str], labels: list[int]) -> SplitSource:
    def read(indices):
        for i in indices:
            yield int(i), load_image_file(files[i]), labels[i]

    return SplitSource(len(files), read, lambda i: files[i])


# --- TensorFlow Datasets ----------------------------------------------------------------------------

def _tfds(spec: str, arg: str) -> Source:
    import tensorflow_datasets as tfds

    name, _, split = arg.partition(":")
    try:
        builder = tfds.builder(name)
    except Exception as e:  # noqa: BLE001 - tfds raises its own DatasetNotFoundError and others
        raise DataError(f"tfds:{name}: unknown or unavailable dataset: {e}") from e
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"tfds:{name}: no 'image' feature; features are {sorted(features.keys())}")
    names = list(features["label"].names) if "label" in features and hasattr(features["label"], "names") else []
    split_names = [split] if split else sorted(builder.info.splits.keys())
    if not split_names:
        raise DataError(f"tfds:{name}: no splits known; name one as tfds:{name}:SPLIT")

    def dataset(s):
        try:
            return builder.as_dataset(split=s, shuffle_files=False)
        except Exception as e:  # noqa: BLE001 - missing data surfaces as various tfds/TF errors
            raise DataError(f"tfds:{name}:{s}: cannot load (is the data prepared in the tfds data dir?): {e}") from e

    splits = {}
    for s in split_names:
        ds = dataset(s)
        count = int(ds.cardinality())
        if count < 0:  # unknown cardinality: count once, the data has to be read anyway
            count = int(ds.reduce(np.int64(0), lambda c, _: c + 1))

        def read(indices, s=s):
            wanted = iter(indices)
            nxt = next(wanted, None)
            for i, ex in enumerate(tfds.as_numpy(dataset(s))):
                if nxt is None:
                    return
                if i == nxt:
                    image = ex["image"]
                    yield i, image if image.ndim == 3 else image[..., None], int(ex["label"]) if names else UNLABELLED
                    nxt = next(wanted, None)

        splits[s] = SplitSource(count, read, lambda i, s=s: f"tfds:{name}:{s}[{i}]")
    return Source(spec, splits, names)
