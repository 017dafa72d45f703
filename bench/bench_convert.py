r"""Conversion throughput: a 32x32x3 npz of random-ish images -> kood TFRecords (target >= 2,000 img/s).

Writes N smooth random images (compressible like photos, see tests/data_helpers.random_images)
to a temp npz, converts them with kood.convert.convert for each encoding and worker count, and
prints images/s (wall clock, including worker start-up) and bytes/image on disk.

    python bench/bench_convert.py [--n=50000] [--workers=1,2] [--encodings=raw,png]
"""

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

flags.DEFINE_integer("n", 50000, "Number of 32x32x3 images.")
flags.DEFINE_list("workers", ["1", "2"], "Worker process counts to try.")
flags.DEFINE_list("encodings", ["raw", "png"], "Encodings to try.")
flags.DEFINE_integer("num_shards", 8, "Output shards.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    from kood.convert import convert
    from tests.data_helpers import random_images

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs (shared with other work), "
          f"python {platform.python_version()}, tensorflow {tf.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        x = random_images(FLAGS.n, seed=0)
        y = np.random.default_rng(0).integers(0, 10, FLAGS.n)
        src = os.path.join(tmp, "data.npz")
        np.savez(src, x=x, y=y)
        print(f"data: {FLAGS.n} random-ish 32x32x3 uint8 images + labels in {src}, {FLAGS.num_shards} shards")
        for encoding in FLAGS.encodings:
            for workers in (int(w) for w in FLAGS.workers):
                out = os.path.join(tmp, f"out_{encoding}_{workers}")
                t = time.perf_counter()
                m = convert(f"npz:{src}", out, encoding=encoding, workers=workers, num_shards=FLAGS.num_shards,
                            show_progress=False)
                dt = time.perf_counter() - t
                size = sum(os.path.getsize(p) for p in m.shard_paths(out, "train"))
                print(f"encoding={encoding:4s} workers={workers}: {FLAGS.n / dt:8,.0f} img/s "
                      f"({dt:.1f} s), {size / FLAGS.n:,.0f} bytes/img on disk")


if __name__ == "__main__":
    run_app(main)
