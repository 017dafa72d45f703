"""Time per call of kood.sampling.energy_cluster_sample inside a tf.function (the GReg+ train-step setting).

Pool of 6 * 64 = 384 candidates, k = 64 clusters, 128 selected, 10 Lloyd iterations; features of
several widths (small_cnn: 32, WRN-40-2: 128, DenseNet-BC-100: 342, ResNet-18: 512). Random data:
the cost does not depend on the values (fixed iterations).

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_sampler.py [--calls=50] [--threads=0]
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
from kood.errors import run_app  # noqa: E402

flags.DEFINE_integer("calls", 50, "Timed calls per setting (after 3 warm-up calls).")
flags.DEFINE_integer("pool", 384, "Candidates per step.")
flags.DEFINE_integer("clusters", 64, "K-means clusters.")
flags.DEFINE_integer("select", 128, "Indices selected.")
flags.DEFINE_integer("iters", 10, "Lloyd iterations.")
flags.DEFINE_integer("threads", 0, "TF intra-op threads (0 = TF default).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import psutil
    import tensorflow as tf

    from kood import sampling

    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cpus, "
          f"TF {tf.__version__}, intra-op threads={FLAGS.threads or 'default'}")
    print(f"pool={FLAGS.pool} clusters={FLAGS.clusters} select={FLAGS.select} iters={FLAGS.iters}")
    for dim in (32, 128, 342, 512):
        features = tf.random.stateless_normal([FLAGS.pool, dim], [0, dim])
        energies = tf.random.stateless_normal([FLAGS.pool], [1, dim])

        @tf.function
        def sample(seed):
            return sampling.energy_cluster_sample(features, energies, num_select=FLAGS.select,
                                                  num_clusters=FLAGS.clusters, iters=FLAGS.iters, seed=seed)

        for step in range(3):
            sample(tf.constant([0, step], tf.int64)).numpy()
        times = []
        for step in range(FLAGS.calls):
            start = time.perf_counter()
            sample(tf.constant([1, step], tf.int64)).numpy()
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"feature dim {dim:4d}: median {1e3 * times[len(times) // 2]:.2f} ms/call, "
              f"p90 {1e3 * times[int(0.9 * len(times))]:.2f} ms")


if __name__ == "__main__":
    run_app(main)
