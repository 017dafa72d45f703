r"""Record image encoding: PNG vs raw uint8 (vs JPEG, lossy) at 32x32x3 and 224x224x3.

Prints bytes/image, encode throughput (one process, PIL as kood.records uses it)
and tf.data read+decode throughput (TFRecordDataset -> parse -> decode -> batch,
AUTOTUNE parallelism), plus JPEG's max pixel error.

Images: colour composites of three Fashion-MNIST (fallback MNIST/KMNIST) images
from /work/shared/data/grayscale28.npz as R, G, B, upscaled bilinearly; or
sklearn digits upscaled when that file is absent.

    python bench/bench_encoding.py [--n32=2000] [--n224=300]
"""

import io
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from kood.errors import run_app  # noqa: E402

flags.DEFINE_integer("n32", 2000, "Images at 32x32x3.")
flags.DEFINE_integer("n224", 300, "Images at 224x224x3.")
FLAGS = flags.FLAGS
DATA = "/work/shared/data/grayscale28.npz"


def base_images(n: int) -> tuple[np.ndarray, str]:
    if os.path.exists(DATA):
        d = np.load(DATA)
        pool = np.concatenate([d["fashion900_x"], d["mnist_test_x"][:600], d["kmnist_test_x"][:600]])
        what = f"{DATA} (Fashion-MNIST + MNIST + KMNIST composites)"
    else:
        from sklearn.datasets import load_digits

        pool = (load_digits().images * (255 / 16)).astype(np.uint8)
        what = "sklearn digits (composites)"
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(pool), size=(n, 3))
    return np.stack([pool[idx[:, c]] for c in range(3)], -1), what


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def encode(image: np.ndarray, codec: str) -> bytes:
    from PIL import Image

    if codec == "raw":
        return image.tobytes()
    buf = io.BytesIO()
    if codec.startswith("png"):
        Image.fromarray(image).save(buf, format="PNG", compress_level=int(codec[3:]))
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=int(codec[4:]))
    return buf.getvalue()


def decode_rate(blobs: list[bytes], codec: str, shape) -> float:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for b in blobs:
                w.write(tf.train.Example(features=tf.train.Features(feature={"image": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[b]))})).SerializeToString())
        spec = {"image": tf.io.FixedLenFeature([], tf.string)}

        def parse(s):
            data = tf.io.parse_single_example(s, spec)["image"]
            if codec == "raw":
                return tf.reshape(tf.io.decode_raw(data, tf.uint8), shape)
            if codec.startswith("png"):
                return tf.ensure_shape(tf.io.decode_png(data, channels=3), shape)
            return tf.ensure_shape(tf.io.decode_jpeg(data, channels=3), shape)

        ds = tf.data.TFRecordDataset(path).map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(128)
        for _ in ds.take(1):
            pass
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            n = sum(int(b.shape[0]) for b in ds)
            best = max(best, n / (time.perf_counter() - t))
        return best


def main(argv):
    del argv
    import tensorflow as tf

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs (shared), python {platform.python_version()}, "
          f"tensorflow {tf.__version__}")
    for size, n in ((32, FLAGS.n32), (224, FLAGS.n224)):
        base, what = base_images(n)
        images = upscale(base, size)
        print(f"\n{n} images {size}x{size}x3 from {what}; raw = {size * size * 3} bytes")
        print(f"{'codec':8s} {'bytes/img':>10s} {'vs raw':>7s} {'encode img/s':>13s} {'tf.data decode img/s':>21s} {'max err':>8s}")
        for codec in ("raw", "png1", "png6", "jpeg95"):
            t = time.perf_counter()
            blobs = [encode(im, codec) for im in images]
            enc = n / (time.perf_counter() - t)
            size_b = np.mean([len(b) for b in blobs])
            err = 0
            if codec.startswith("jpeg"):
                from PIL import Image
                err = max(int(np.abs(np.asarray(Image.open(io.BytesIO(b))).astype(int) - im).max())
                          for b, im in zip(blobs[:100], images[:100]))
            dec = decode_rate(blobs, codec, (size, size, 3))
            print(f"{codec:8s} {size_b:10.0f} {size_b / (size * size * 3):7.2f} {enc:13,.0f} {dec:21,.0f} {err:8d}")


if __name__ == "__main__":
    run_app(main)
