"""kood.sampling: in-graph K-means against sklearn, cluster picks against a numpy reference."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from kood import sampling
from kood.errors import ConfigError
from tests.model_helpers import blobs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_matches_sklearn_on_separated_blobs(seed):
    x, truth = blobs(6, 40, dim=8, seed=seed)
    assign, centers = sampling.kmeans(x, 6, iters=10, seed=seed)
    reference = KMeans(6, n_init=3, random_state=seed).fit_predict(x)
    assert adjusted_rand_score(reference, assign.numpy()) == 1.0
    assert adjusted_rand_score(truth, assign.numpy()) == 1.0
    # Each center is the mean of its points.
    for j in range(6):
        np.testing.assert_allclose(centers.numpy()[j], x[assign.numpy() == j].mean(0), atol=1e-4)


def test_kmeans_survives_more_clusters_than_distinct_points():
    x = np.repeat(np.eye(3, dtype="float32"), 5, axis=0)  # 15 points, 3 distinct
    assign, centers = sampling.kmeans(x, 8, iters=5, seed=4)
    assign, centers = assign.numpy(), centers.numpy()
    assert np.all(np.isfinite(centers)) and assign.min() >= 0 and assign.max() < 8
    np.testing.assert_allclose(centers[assign], x, atol=1e-6)  # every point sits on its center
    assert len(np.unique(assign)) == 3


def test_kmeans_empty_cluster_keeps_its_previous_center():
    # Two distinct points, k = 3: two centers coincide, argmin gives all their points to one, and the
    # other stays empty; it must keep its init position (a data point), not become NaN or zero.
    x = np.array([[1.0, 2.0]] * 4 + [[5.0, -1.0]] * 4, "float32")
    assign, centers = sampling.kmeans(tf.constant(x), 3, iters=4, seed=5)
    used = np.unique(assign.numpy())
    assert len(used) == 2
    (empty,) = set(range(3)) - set(used)
    assert np.min(np.linalg.norm(x - centers.numpy()[empty], axis=1)) < 1e-6


def test_kmeans_in_tf_function_is_seeded_by_a_tensor():
    x, _ = blobs(3, 20, dim=4, spread=1.5, seed=6)
    run = tf.function(lambda s: sampling.kmeans(x, 12, iters=3, seed=s)[0])
    a = run(tf.constant([0, 1], tf.int64)).numpy()
    b = run(tf.constant([0, 1], tf.int64)).numpy()
    c = run(tf.constant([0, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _reference_picks(assign, energies, k, two_way):
    picks = set()
    for j in range(k):
        members = np.flatnonzero(assign == j)
        if len(members):
            picks.add(members[np.argmin(energies[members])])
            if two_way:
                picks.add(members[np.argmax(energies[members])])
    return picks


@pytest.mark.parametrize("two_way", [True, False])
def test_select_from_clusters_matches_numpy_reference(two_way):
    rng = np.random.default_rng(7)
    k, n = 10, 60
    assign = rng.integers(0, k, n)
    assign[assign == 3] = 4  # cluster 3 empty
    assign[np.flatnonzero(assign == 5)[1:]] = 6  # cluster 5 a singleton: lowest == highest
    energies = rng.normal(0, 5, n).astype("float32")
    idx = sampling.select_from_clusters(assign, energies, num_select=25, num_clusters=k, two_way=two_way,
                                        seed=1).numpy()
    expected = _reference_picks(assign, energies, k, two_way)
    assert len(idx) == 25 and len(set(idx)) == 25 and idx.min() >= 0 and idx.max() < n
    assert set(idx[:len(expected)]) == expected  # the picks come first, then the random top-up
    other = sampling.select_from_clusters(assign, energies, num_select=25, num_clusters=k, two_way=two_way,
                                          seed=2).numpy()
    assert set(other[:len(expected)]) == expected and set(other) != set(idx)


def test_energy_cluster_sample_picks_extremes_of_each_blob():
    per = 12
    x, truth = blobs(5, per, dim=6, seed=8)
    rng = np.random.default_rng(8)
    energies = rng.normal(0, 1, len(x)).astype("float32")
    # Features are L2-normalized first: scaling a sample must not change its cluster.
    scaled = x * rng.uniform(0.5, 2.0, (len(x), 1)).astype("float32")
    idx = sampling.energy_cluster_sample(scaled, energies, num_select=16, num_clusters=5, seed=3).numpy()
    expected = _reference_picks(truth, energies, 5, two_way=True)
    assert len(expected) == 10 and expected <= set(idx)
    assert len(set(idx)) == 16


def test_energy_cluster_sample_compiles_with_xla():
    # train steps compiled with jit_compile=True run the sampler under XLA (no StatelessMultinomial there).
    per = 12
    x, truth = blobs(5, per, dim=6, seed=8)
    energies = np.random.default_rng(8).normal(0, 1, len(x)).astype("float32")
    sample = tf.function(lambda s: sampling.energy_cluster_sample(x, energies, num_select=16, num_clusters=5,
                                                                  seed=s), jit_compile=True)
    for step in range(2):
        idx = sample(tf.constant([3, step], tf.int64)).numpy()
        assert _reference_picks(truth, energies, 5, two_way=True) <= set(idx) and len(set(idx)) == 16


def test_energy_cluster_sample_in_tf_function_on_the_train_step_pool():
    feats = tf.random.stateless_normal([384, 32], [1, 2])
    energies = tf.random.stateless_normal([384], [3, 4])
    sample = tf.function(lambda s: sampling.energy_cluster_sample(feats, energies, num_select=128,
                                                                  num_clusters=64, seed=s))
    first = sample(tf.constant([0, 1], tf.int64)).numpy()
    second = sample(tf.constant([0, 2], tf.int64)).numpy()
    assert first.shape == (128,) and len(set(first)) == 128 and first.dtype == np.int32
    assert set(first) != set(second)
    assert sample.experimental_get_tracing_count() == 1  # a new seed does not retrace


def test_sampler_argument_errors():
    feats, energies = tf.zeros([10, 3]), tf.zeros([10])
    with pytest.raises(ConfigError, match="num_select=11"):
        sampling.energy_cluster_sample(feats, energies, num_select=11, num_clusters=2, seed=0)
    with pytest.raises(ConfigError, match="num_clusters=4, two_way=True"):
        sampling.energy_cluster_sample(feats, energies, num_select=6, num_clusters=4, seed=0)
    with pytest.raises(ConfigError, match="k=0"):
        sampling.kmeans(feats, 0)
    with pytest.raises(ConfigError, match="seed shape"):
        sampling.kmeans(feats, 2, seed=tf.constant([1, 2, 3]))
    with pytest.raises(ConfigError, match="num_select=5, num_candidates=4"):
        sampling.random_sample(4, 5)


def test_random_sample_unique_and_seeded():
    a = sampling.random_sample(50, 20, seed=1).numpy()
    assert len(set(a)) == 20 and a.max() < 50
    np.testing.assert_array_equal(a, sampling.random_sample(50, 20, seed=1).numpy())
    assert set(a) != set(sampling.random_sample(50, 20, seed=2).numpy())


def test_kmeans_and_the_sampler_take_numpy_float64_points_and_numpy_integer_sizes():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])  # float64, as numpy makes them
    assign, centers = sampling.kmeans(blobs, np.int64(2), iters=np.int32(5), seed=0)
    assert centers.dtype == tf.float64
    assert len(set(assign.numpy()[:20])) == 1 and len(set(assign.numpy()[20:])) == 1
    assert assign.numpy()[0] != assign.numpy()[-1]
    idx = sampling.energy_cluster_sample(blobs, rng.normal(size=40), num_select=np.int64(8),
                                         num_clusters=np.int64(2), seed=0)
    assert len(set(idx.numpy())) == 8
    assert sampling.random_sample(np.int64(10), np.int64(3), seed=0).shape == (3,)
    with pytest.raises(ConfigError, match="k=True"):
        sampling.kmeans(blobs, True)


def test_kmeans_of_no_points_is_a_config_error():
    with pytest.raises(ConfigError, match=r"`x` must be \[N, D\] with N >= 1. Received: x shape=\(0, 3\)"):
        sampling.kmeans(np.zeros((0, 3), np.float32), 2)
