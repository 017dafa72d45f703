"""Peak memory of `kood.data.outlier_stream` does not depend on the outlier set's size.

Makes a 30K and a 300K-image 32x32x3 uint8 .npy (np.lib.format.open_memmap, smooth random
images), converts both with `kood.convert.convert` (what `python -m data_prep.outliers` runs),
then streams the same number of batches from each in a fresh subprocess and prints its peak RSS.
The two peaks must be within 10% of each other.

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_outlier_memory.py [--steps 100] [--batch_size 768]
    # keep the converted sets for a rerun:  --work_dir /tmp/kood_outlier_bench
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SIZES = (30_000, 300_000)
IMAGES_PER_SHARD = 3_750


def make_npy(path: str, n: int, seed: int = 0, chunk: int = 10_000) -> None:
    """Smooth random images (upsampled 8x8 noise + pixel noise), written chunk by chunk."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        small = rng.integers(0, 256, (m, 8, 8, 3)).astype(np.float32)
        big = small.repeat(4, axis=1).repeat(4, axis=2) + rng.normal(0, 8, (m, 32, 32, 3))
        out[start:start + m] = np.clip(big, 0, 255).astype(np.uint8)
    out.flush()
    del out


def _peak_rss_mib() -> float:
    """This process's peak RSS. Not `getrusage().ru_maxrss`: Linux keeps it across execve, so a child
    would report its parent's peak (the parent grows while converting the 300K set)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # non-Linux: no execve carry-over issue


def stream(directory: str, steps: int, batch_size: int) -> None:
    """Child process: stream `steps` batches, print the peak RSS in MiB and the rate."""
    from kood import data

    it = iter(data.outlier_stream(directory, batch_size=batch_size, seed=0, image_shape=(32, 32, 3)))
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    rate = steps * batch_size / (time.perf_counter() - start)
    peak_mib = _peak_rss_mib()
    print(f"{peak_mib:.1f} {rate:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=768, help="6 x 128: a GReg+ candidate pool")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work_dir", default=None, help="keep the sets here (default: a temp dir, removed)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stream(args.child, args.steps, args.batch_size)
        return

    from kood.convert import convert

    root = args.work_dir or tempfile.mkdtemp(prefix="kood_outlier_bench_")
    os.makedirs(root, exist_ok=True)
    try:
        peaks = {}
        for n in SIZES:
            out = os.path.join(root, f"rand{n // 1000}k")
            if not os.path.exists(os.path.join(out, "manifest.json")):
                npy = os.path.join(root, f"rand{n // 1000}k.npy")
                t = time.perf_counter()
                make_npy(npy, n)
                convert(f"npy:{npy}", out, kind="outlier", num_shards=n // IMAGES_PER_SHARD,
                        workers=args.workers, overwrite=True)
                os.remove(npy)
                print(f"made and converted {n} images in {time.perf_counter() - t:.0f}s -> {out}", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", out,
                   "--steps", str(args.steps), "--batch_size", str(args.batch_size)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peak, rate = result.stdout.split()[-2:]
            peaks[n] = float(peak)
            print(f"{n:>7} images ({n // IMAGES_PER_SHARD} shards): peak RSS {float(peak):7.1f} MiB, "
                  f"{float(rate):,.0f} images/s over {args.steps} batches of {args.batch_size}", flush=True)
        small, big = peaks[SIZES[0]], peaks[SIZES[1]]
        diff = abs(big - small) / small
        print(f"peak RSS difference: {100 * diff:.1f}% ({'OK' if diff <= 0.10 else 'FAIL'}: limit 10%); "
              f"load average {os.getloadavg()}")
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
