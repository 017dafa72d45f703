"""In-graph K-means and the GReg+ energy-based clustering sampler (methods.md, Algorithm 1).

Everything is TF ops with static shapes and stateless random ops seeded by a tensor, so it runs
inside a `train_step` tf.function (no XLA needed) and differs every step when the step counter
is part of the seed.

Example:
    idx = energy_cluster_sample(features, energies, num_select=128, num_clusters=64,
                                seed=tf.stack([seed, step]))
    chosen = tf.gather(pool, idx)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kood.errors import ConfigError


def _as_seed(seed) -> tf.Tensor:
    """int, scalar tensor or shape-[2] tensor -> int64 [2] seed of the stateless random ops."""
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise ConfigError(f"`seed` must be an integer or integer tensor. Received: seed dtype={seed.dtype.name}")
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        return tf.stack([seed, tf.constant(0, tf.int64)])
    if seed.shape.as_list() != [2]:
        raise ConfigError(f"`seed` must be a scalar or have shape [2]. Received: seed shape={seed.shape}")
    return seed


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int if it is one (Python or numpy) >= `minimum`, else a ConfigError naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return int(value)


def _squared_distances(x: tf.Tensor, centers: tf.Tensor) -> tf.Tensor:
    """[N, k] squared Euclidean distances, one matmul (clipped at 0 against round-off)."""
    d2 = (tf.reduce_sum(tf.square(x), 1, keepdims=True) - 2.0 * tf.matmul(x, centers, transpose_b=True)
          + tf.reduce_sum(tf.square(centers), 1)[None, :])
    return tf.maximum(d2, 0.0)


def _kmeans_pp_init(x: tf.Tensor, k: int, seed: tf.Tensor) -> tf.Tensor:
    """k-means++ centers [k, D]: each next center drawn with probability proportional to D(x)^2."""
    n = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(seed, num=k)
    first = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=n, dtype=tf.int32)
    # tf.gather, not x[first]: XLA needs a strided slice's bounds at compile time, which made the seed
    # a compile-time constant (a new XLA compilation, seconds, every step under jit_compile=True).
    first_x = tf.gather(x, first[None])
    centers = tf.tensor_scatter_nd_update(tf.zeros([k, tf.shape(x)[1]], x.dtype), [[0]], first_x)
    min_d2 = tf.reduce_sum(tf.square(x - first_x), 1)

    def body(i, centers, min_d2):
        # All remaining points coincide with a center (k > distinct points): draw uniformly.
        logits = tf.where(tf.reduce_any(min_d2 > 0),
                          tf.math.log(tf.where(min_d2 > 0, min_d2, 0.0)), tf.zeros_like(min_d2))
        # Gumbel-max draw from softmax(logits): same distribution as stateless_categorical, which XLA
        # cannot compile (StatelessMultinomial), so `jit_compile=True` train steps work too.
        u = tf.random.stateless_uniform(tf.shape(logits), seeds[i], minval=1e-12, maxval=1.0, dtype=logits.dtype)
        pick = tf.argmax(logits - tf.math.log(-tf.math.log(u)), output_type=tf.int32)
        pick_x = tf.gather(x, pick[None])
        centers = tf.tensor_scatter_nd_update(centers, [[i]], pick_x)
        return i + 1, centers, tf.minimum(min_d2, tf.reduce_sum(tf.square(x - pick_x), 1))

    _, centers, _ = tf.while_loop(lambda i, *_: i < k, body, (tf.constant(1), centers, min_d2))
    return centers


def kmeans(x: tf.Tensor, k: int, iters: int = 10, seed=0):
    """K-means (k-means++ init, `iters` Lloyd iterations) in TF ops.

    An empty cluster keeps its previous center (it can win points back later); with k larger
    than the number of distinct points some clusters simply stay empty.

    Args:
        x: [N, D] float points, N >= 1.
        k: number of clusters (Python int >= 1).
        iters: Lloyd iterations (fixed count, no convergence test: static graph).
        seed: int, scalar or [2] integer tensor.

    Returns:
        (assignments int32 [N] in [0, k), centers [k, D]).

    Example:
        assign, centers = kmeans(tf.random.normal([384, 128]), 64, seed=tf.constant([0, step]))
    """
    k = _check_positive_int("k", k)
    iters = _check_positive_int("iters", iters, minimum=0)
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float64:  # float64 (numpy's default) stays; integers and 16-bit floats compute in float32
        x = tf.cast(x, tf.float32)
    if x.shape.rank != 2 or x.shape[0] == 0:
        raise ConfigError(f"kmeans: `x` must be [N, D] with N >= 1. Received: x shape={x.shape}")
    centers = _kmeans_pp_init(x, k, _as_seed(seed))

    for _ in range(iters):
        assign = tf.argmin(_squared_distances(x, centers), axis=1, output_type=tf.int32)
        sums = tf.math.unsorted_segment_sum(x, assign, k)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(x[:, :1]), assign, k)
        centers = tf.where(counts > 0, sums / tf.maximum(counts, 1.0), centers)
    assign = tf.argmin(_squared_distances(x, centers), axis=1, output_type=tf.int32)
    return assign, centers


def select_from_clusters(assignments: tf.Tensor, energies: tf.Tensor, *, num_select: int, num_clusters: int,
                         two_way: bool = True, seed=0) -> tf.Tensor:
    """From each non-empty cluster its lowest- (and, two-way, highest-) energy sample, topped up at random.

    Args:
        assignments: int [N] cluster ids in [0, num_clusters).
        energies: float [N].
        num_select: indices to return (<= N, >= num_clusters, or >= 2 * num_clusters when two-way).
        num_clusters: number of cluster ids.
        two_way: also take each cluster's highest-energy sample (GReg+ default).
        seed: int, scalar or [2] integer tensor (the random top-up).

    Returns:
        int32 [num_select] unique indices: the cluster picks first (ascending index), then random
        unused candidates.

    Example:
        idx = select_from_clusters(assign, energies, num_select=128, num_clusters=64)
    """
    num_select = _check_positive_int("num_select", num_select)
    num_clusters = _check_positive_int("num_clusters", num_clusters)
    per_cluster = 2 if two_way else 1
    if num_select < per_cluster * num_clusters:
        raise ConfigError(f"`num_select` must hold {per_cluster} pick(s) per cluster (>= {per_cluster * num_clusters}"
                          f"). Received: num_select={num_select}, num_clusters={num_clusters}, two_way={two_way}")
    energies = tf.cast(energies, tf.float32)
    n_static = energies.shape[0]
    if n_static is not None and num_select > n_static:
        raise ConfigError(f"`num_select` must be <= the number of candidates ({n_static}). "
                          f"Received: num_select={num_select}")
    n = tf.shape(energies)[0]
    checks = [] if n_static is not None else [tf.debugging.assert_less_equal(
        num_select, n, message="energy_cluster_sample: num_select exceeds the candidate pool")]
    with tf.control_dependencies(checks):
        member = tf.equal(tf.cast(assignments, tf.int32)[:, None], tf.range(num_clusters)[None, :])  # [N, k]
    nonempty = tf.reduce_any(member, axis=0)
    inf = tf.constant(float("inf"))
    lowest = tf.argmin(tf.where(member, energies[:, None], inf), axis=0, output_type=tf.int32)
    picks = [lowest]
    if two_way:
        picks.append(tf.argmax(tf.where(member, energies[:, None], -inf), axis=0, output_type=tf.int32))
    picks = tf.concat(picks, 0)
    valid = tf.tile(nonempty, [per_cluster])
    # Scatter-max of a 0/1 flag de-duplicates (a singleton cluster's lowest == highest).
    chosen = tf.tensor_scatter_nd_max(tf.zeros([n], tf.int32), picks[:, None], tf.cast(valid, tf.int32))
    # Chosen samples rank above every random key, so top_k keeps all of them, then random ones.
    # Among chosen ones, ties are broken toward the lower index (top_k is stable).
    noise = tf.random.stateless_uniform([n], _as_seed(seed))
    keys = tf.where(chosen > 0, 2.0, noise)
    return tf.math.top_k(keys, k=num_select, sorted=True).indices


def energy_cluster_sample(features: tf.Tensor, energies: tf.Tensor, *, num_select: int, num_clusters: int,
                          two_way: bool = True, iters: int = 10, seed=0) -> tf.Tensor:
    """GReg+ sampling: L2-normalize features, K-means, pick per cluster by energy, top up at random.

    Args:
        features: [N, D] penultimate features of the candidate pool (inference mode, no gradient).
        energies: [N] energy scores of the pool.
        num_select: number of indices (GReg+: 2 * B_id); num_clusters * (2 if two_way else 1) <= num_select <= N.
        num_clusters: k (GReg+: min(64, B_id)).
        two_way: lowest- and highest-energy sample per cluster (True) or lowest only.
        iters: Lloyd iterations.
        seed: int, scalar or [2] integer tensor; pass the step counter in it so every step differs.

    Returns:
        int32 [num_select] unique indices into the pool.

    Example:
        idx = energy_cluster_sample(out["features"], energy_score(out["logits"]), num_select=128,
                                    num_clusters=64, seed=tf.stack([seed, step]))
    """
    seed = _as_seed(seed)
    kmeans_seed, topup_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    features = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=1)
    assign, _ = kmeans(features, num_clusters, iters=iters, seed=kmeans_seed)
    return select_from_clusters(assign, energies, num_select=num_select, num_clusters=num_clusters,
                                two_way=two_way, seed=topup_seed)


def random_sample(num_candidates: int, num_select: int, seed=0) -> tf.Tensor:
    """`num_select` unique random indices in [0, num_candidates) (plain GReg's random outlier batch).

    Example:
        idx = random_sample(384, 64, seed=tf.stack([seed, step]))
    """
    num_candidates = _check_positive_int("num_candidates", num_candidates)
    num_select = _check_positive_int("num_select", num_select)
    if num_select > num_candidates:
        raise ConfigError(f"`num_select` must be <= `num_candidates`. Received: num_select={num_select}, "
                          f"num_candidates={num_candidates}")
    noise = tf.random.stateless_uniform([num_candidates], _as_seed(seed))
    return tf.math.top_k(noise, k=num_select).indices
