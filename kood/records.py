"""One `tf.train.Example` per image: the record format of every kood data set.

Features: `image` (encoded bytes), `label` (int64, -1 = unlabelled), `index`
(int64, position of the image in its source, for traceability) and
`confidence` (float, the pseudo-label confidence; 1.0 for given labels).
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

ENCODINGS = ("png", "raw")
UNLABELLED = -1


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """Encodes a uint8 `[H, W, C]` image losslessly."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"Expected a uint8 [H, W, C] image. Received: dtype={image.dtype}, shape={image.shape}")
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes()
    if encoding == "png":
        from PIL import Image  # PIL is much faster than tf.io.encode_png for single small images

        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"encoding must be one of {ENCODINGS}. Received: {encoding!r}")


def encode_example(image: np.ndarray, label: int, index: int, encoding: str,
                   confidence: float = 1.0) -> bytes:
    """Serializes one image record."""
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode_image(image, encoding)])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(index)])),
        "confidence": tf.train.Feature(float_list=tf.train.FloatList(value=[float(confidence)])),
    }
    # deterministic: map order otherwise varies between processes, so shards written by
    # workers (or reruns) would differ byte-wise and their sha256 would not be reproducible
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "index": tf.io.FixedLenFeature([], tf.int64),
    "confidence": tf.io.FixedLenFeature([], tf.float32, default_value=1.0),
}


def decode_image(data: tf.Tensor, image_shape: tuple[int, int, int], encoding: str) -> tf.Tensor:
    """Decodes image bytes to a uint8 tensor of the static shape `image_shape`."""
    if encoding == "raw":
        image = tf.reshape(tf.io.decode_raw(data, tf.uint8), image_shape)
    elif encoding == "png":
        image = tf.io.decode_png(data, channels=image_shape[-1])
        image = tf.ensure_shape(image, image_shape)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}. Received: {encoding!r}")
    return image


def parse_example(serialized: tf.Tensor, image_shape: tuple[int, int, int], encoding: str) -> dict[str, tf.Tensor]:
    """Parses one serialized record into `{image, label, index, confidence}` (graph-safe)."""
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    parsed["image"] = decode_image(parsed["image"], image_shape, encoding)
    return parsed


def parse_example_numpy(serialized: bytes) -> dict:
    """Eager/NumPy parse without the image decode (for verification tools)."""
    ex = tf.train.Example.FromString(serialized)
    f = ex.features.feature
    return {
        "image": f["image"].bytes_list.value[0],
        "label": f["label"].int64_list.value[0],
        "index": f["index"].int64_list.value[0],
        "confidence": f["confidence"].float_list.value[0] if "confidence" in f else 1.0,
    }
