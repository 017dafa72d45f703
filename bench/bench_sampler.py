"""Time per call of kood.sampling.energy_cluster_sample inside a tf.function (the GReg+ train-step setting).

Pool of 6 * 64 = 384 candidates, k = 64 clusters, 128 selected, 10 Lloyd iterations; features of
several widths (small_cnn: 32, WRN-40-2: 128, DenseNet-BC-100: 342, ResNet-18: 512). Random data:
the cost does not depend on the values (fixed iterations).

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_sampler.py [--calls=50] [--threads=0]

Then the quality of the in-graph K-means against the reference code's scikit-learn KMeans
(k-means++, n_init=3, run to convergence): inertia on L2-normalized, non-negative (post-ReLU-like)
candidates drawn around 40 latent groups, 128-d.
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
flags.DEFINE_integer("quality_trials", 3, "Pools compared with scikit-learn's KMeans (0 = skip).")
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
    _kmeans_quality(sampling, tf)


def _kmeans_quality(sampling, tf) -> None:
    import numpy as np
    from sklearn.cluster import KMeans

    def inertia(x, assignment):
        return sum(((x[assignment == j] - x[assignment == j].mean(0)) ** 2).sum() for j in np.unique(assignment))

    rng = np.random.default_rng(0)
    for trial in range(FLAGS.quality_trials):
        centers, groups = np.abs(rng.normal(size=(40, 128))), rng.integers(0, 40, FLAGS.pool)
        x = np.abs(centers[groups] + rng.normal(0, 0.8, (FLAGS.pool, 128)))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        ours = inertia(x, sampling.kmeans(tf.constant(x), FLAGS.clusters, iters=FLAGS.iters, seed=trial)[0].numpy())
        ref = KMeans(FLAGS.clusters, init="k-means++", n_init=3, random_state=trial).fit(x).inertia_
        print(f"k-means quality, pool {trial}: kood inertia {ours:.2f} ({FLAGS.iters} iterations, 1 start), "
              f"scikit-learn {ref:.2f} (3 starts, to convergence): {100 * (ours / ref - 1):+.1f}%")


if __name__ == "__main__":
    run_app(main)
