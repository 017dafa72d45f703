"""Reader throughput: parse + decode + shuffle + augment (crop + flip) + batch, in images/s.

Writes a made-up 32x32x3 set (smooth random images, so PNGs are CIFAR-sized) to a temp dir,
then times `kood.data.train_dataset` (plain and SIO 0.8) and `outlier_stream` after a warm-up.
Target: >= 5,000 images/s on a 2-core CPU machine.

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_reader.py [--images 20000] [--encoding png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from kood import data  # noqa: E402
from kood.writer import write_arrays  # noqa: E402


def made_up_images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random images: upsampled 8x8 noise plus a little pixel noise (PNG size like CIFAR)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
    big = small.repeat(4, axis=1).repeat(4, axis=2) + rng.normal(0, 8, (n, 32, 32, 3))
    return np.clip(big, 0, 255).astype(np.uint8)


def throughput(ds, batch_size: int, steps: int, warmup: int = 20) -> float:
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--encoding", default="png", choices=["png", "raw"])
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="kood_bench_reader_")
    try:
        x = made_up_images(args.images)
        y = np.arange(args.images) % 10
        t = time.perf_counter()
        write_arrays(os.path.join(root, "real"), {"train": (x, y)}, num_shards=8, encoding=args.encoding)
        write_arrays(os.path.join(root, "syn"), {"train": (x[: args.images // 2], y[: args.images // 2])},
                     kind="synthetic", num_shards=4, encoding=args.encoding)
        print(f"wrote {args.images} + {args.images // 2} {args.encoding} images in {time.perf_counter() - t:.1f}s")
        print(f"machine: {psutil.cpu_count()} CPUs, load average {os.getloadavg()} (other processes share the CPU)")
        b = args.batch_size
        cases = {
            "train_dataset augment": data.train_dataset(os.path.join(root, "real"), batch_size=b)[0],
            "train_dataset augment SIO 0.8": data.train_dataset(
                os.path.join(root, "real"), batch_size=b, syn_directory=os.path.join(root, "syn"), sio_ratio=0.8)[0],
            "train_dataset no augment": data.train_dataset(os.path.join(root, "real"), batch_size=b,
                                                           augment=False)[0],
            "outlier_stream augment (6B)": data.outlier_stream(os.path.join(root, "real"), batch_size=6 * b),
        }
        for name, ds in cases.items():
            bs = 6 * b if "6B" in name else b
            rate = throughput(ds, bs, max(args.steps * b // bs, 20))
            print(f"{name:32s} {rate:10,.0f} images/s  (batch {bs}, 32x32x3 {args.encoding})")
        print(f"load average after: {os.getloadavg()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
