"""Evaluation throughput (images/s) of every kood detector on this machine.

A `small_cnn` classifier (kood.models, random weights; throughput does not depend on training) on
random 32x32x3 images. For each detector: fit time on --fit ID images (if it needs fitting), and
scoring throughput = images / (forward pass + score), each detector timed alone with its own forward
pass (kood.evaluate shares one forward pass between all output-based detectors, so a multi-detector
evaluation is faster than the sum). Prints a markdown table.

Usage:
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_detectors.py [--num=4096] [--fit=4096] [--batch_size=256]
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from kood.detectors import DETECTORS, make_detector  # noqa: E402
from kood.models import build_classifier  # noqa: E402
from kood.errors import run_app  # noqa: E402

flags.DEFINE_integer("num", 4096, "Images scored per detector.")
flags.DEFINE_integer("fit", 4096, "ID fit images for detectors that need fitting.")
flags.DEFINE_integer("batch_size", 256, "Images per batch.")
flags.DEFINE_string("arch_width", "16", "small_cnn width.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    model = build_classifier("small_cnn", input_shape=(32, 32, 3), num_classes=10, mean=[127.0] * 3,
                             std=[64.0] * 3, width=int(FLAGS.arch_width), depth=3)
    images = rng.integers(0, 256, (FLAGS.num, 32, 32, 3)).astype(np.float32)
    fit_x = rng.integers(0, 256, (FLAGS.fit, 32, 32, 3)).astype(np.float32)
    fit_y = np.arange(FLAGS.fit) % 10
    fit_ds = tf.data.Dataset.from_tensor_slices((fit_x, fit_y)).batch(FLAGS.batch_size)
    batches = [images[i:i + FLAGS.batch_size] for i in range(0, len(images), FLAGS.batch_size)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"TF {tf.__version__}; model small_cnn(width={FLAGS.arch_width}, depth=3) 32x32x3, "
          f"{model.count_params():,} params; {FLAGS.num} scored, {FLAGS.fit} fit images, batch {FLAGS.batch_size}")
    print("\n| detector | fit s | score images/s |\n|---|---|---|")
    for name in DETECTORS:
        det = make_detector(name, model)
        t0 = time.perf_counter()
        det.fit(fit_ds)
        fit_s = time.perf_counter() - t0 if det.needs_fit else 0.0
        det.score(batches[0])  # trace / warm up
        t0 = time.perf_counter()
        for b in batches:
            det.score(b)
        rate = FLAGS.num / (time.perf_counter() - t0)
        print(f"| {name} | {fit_s:.2f} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    run_app(main)
