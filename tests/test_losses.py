"""kood.losses against numpy references, closed forms and per-sample loops."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import log_softmax, logsumexp

from kood import losses
from kood.models import normalized_model
from tests.model_helpers import linear_classifier, tiny_classifier, tiny_images

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_energy_score_matches_numpy(temperature):
    logits = RNG.normal(0, 3, (7, 5)).astype("float32")
    expected = -temperature * logsumexp(logits / temperature, axis=1)
    np.testing.assert_allclose(losses.energy_score(logits, temperature).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_energy_loss_oe_loss_and_objective_match_numpy():
    s_id = np.array([-30.0, -24.0, -20.0, -26.0], "float32")
    s_aux = np.array([-10.0, -5.0, -8.0], "float32")
    m_in, m_out = -25.0, -7.0
    expected = (np.mean(np.maximum(s_id - m_in, 0) ** 2) + np.mean(np.maximum(m_out - s_aux, 0) ** 2))
    np.testing.assert_allclose(losses.energy_loss(s_id, s_aux, m_in, m_out).numpy(), expected, rtol=1e-6)
    j = -np.mean(np.maximum(m_in - s_id, 0)) + np.mean(np.maximum(s_aux - m_out, 0))
    np.testing.assert_allclose(losses.greg_objective(s_id, s_aux, m_in, m_out).numpy(), j, rtol=1e-6)
    logits = RNG.normal(0, 2, (6, 4)).astype("float32")
    np.testing.assert_allclose(losses.oe_loss(logits).numpy(), np.mean(-log_softmax(logits, 1).mean(1)), rtol=1e-5)


def test_empty_aux_part_contributes_zero_not_nan():
    s_id = tf.constant([-20.0, -30.0])
    empty = tf.zeros([0])
    assert losses.energy_loss(s_id, empty, -25.0, -7.0).numpy() == pytest.approx(25.0 / 2)
    assert losses.greg_objective(s_id, empty, -25.0, -7.0).numpy() == pytest.approx(-5.0 / 2)
    assert losses.oe_loss(tf.zeros([0, 3])).numpy() == 0.0


def test_greg_masks_are_the_complement_of_energy_loss_masks():
    s_id = tf.constant([-30.0, -24.0, -20.0, -26.0, -25.0])
    s_aux = tf.constant([-10.0, -5.0, -8.0, 0.0, -7.0])
    active_id, active_aux = losses.energy_loss_masks(s_id, s_aux, -25.0, -7.0)
    keep_id, keep_aux = losses.greg_masks(s_id, s_aux, -25.0, -7.0)
    np.testing.assert_array_equal(active_id.numpy(), [False, True, True, False, False])
    np.testing.assert_array_equal(active_aux.numpy(), [True, False, True, False, False])
    # Complement everywhere except exactly on the margin (last sample), where neither term acts.
    np.testing.assert_array_equal(keep_id.numpy()[:4], ~active_id.numpy()[:4])
    np.testing.assert_array_equal(keep_aux.numpy()[:4], ~active_aux.numpy()[:4])
    assert not keep_id.numpy()[4] and not keep_aux.numpy()[4]
    # The masks are exactly where J's gradient w.r.t. the energies is non-zero.
    with tf.GradientTape() as tape:
        tape.watch([s_id, s_aux])
        j = losses.greg_objective(s_id, s_aux, -25.0, -7.0)
    g_id, g_aux = tape.gradient(j, [s_id, s_aux])
    np.testing.assert_array_equal(g_id.numpy() != 0, keep_id.numpy())
    np.testing.assert_array_equal(g_aux.numpy() != 0, keep_aux.numpy())


def test_grad_norm_per_sample_value_and_zero_gradient_at_zero():
    g = tf.constant(RNG.normal(0, 1, (3, 2, 2, 1)).astype("float32") * np.array([1, 0, 1])[:, None, None, None])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(g)
        norms = losses.grad_norm_per_sample(g)
        naive = tf.norm(tf.reshape(g, [3, -1]), axis=1)
    np.testing.assert_allclose(norms.numpy(), np.linalg.norm(g.numpy().reshape(3, -1), axis=1), rtol=1e-6)
    grad = tape.gradient(norms, g).numpy()
    assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0)
    assert np.isnan(tape.gradient(naive, g).numpy()).any()  # what the guard prevents


def _margins_splitting(net, x_norm, num_id, training=False):
    """Margins halfway between two energies of each part: about half the samples kept, none on a tie."""
    s = losses.energy_score(net(x_norm, training=training)["logits"]).numpy()

    def between(v):
        v = np.sort(v)
        return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    return between(s[:num_id]), between(s[num_id:])


@pytest.mark.parametrize("pixel_space", [False, True])
def test_penalty_matches_closed_form_on_linear_model(pixel_space):
    model = linear_classifier((4, 4, 2), num_classes=3)
    net, normalize = normalized_model(model), model.get_layer("normalize")
    x_norm = normalize(tiny_images(10, (4, 4, 2), seed=1))
    num_id = 6
    m_in, m_out = _margins_splitting(net, x_norm, num_id)
    std = np.sqrt(normalize.variance.numpy().reshape(-1))
    res = losses.score_gradient_penalty(net, x_norm, num_id, m_in, m_out,
                                        pixel_scale=1.0 / std if pixel_space else None)

    kernel, bias = model.get_layer("classifier").get_weights()
    z = x_norm.numpy().reshape(10, -1) @ kernel + bias
    s = -logsumexp(z, axis=1)
    softmax = np.exp(z + s[:, None])
    ds_dx = -(softmax @ kernel.T).reshape(10, 4, 4, 2)  # dS/dx_norm per sample
    if pixel_space:
        ds_dx = ds_dx / std
    keep = np.concatenate([s[:num_id] < m_in, s[num_id:] > m_out])
    part = np.array([num_id] * num_id + [10 - num_id] * (10 - num_id))
    expected = np.where(keep, np.linalg.norm(ds_dx.reshape(10, -1), axis=1) / part, 0.0)
    assert 0 < keep.sum() < 10
    np.testing.assert_allclose(res["grad_norms"].numpy(), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res["penalty"].numpy(), expected.mean(), rtol=1e-4)
    np.testing.assert_allclose(res["energies"].numpy(), s, rtol=1e-5)


def test_penalty_matches_per_sample_loop_in_inference_mode():
    model = tiny_classifier((8, 8, 1), num_classes=3)
    net = normalized_model(model)
    x_norm = model.get_layer("normalize")(tiny_images(8, seed=2))
    num_id = 5
    m_in, m_out = _margins_splitting(net, x_norm, num_id)
    res = losses.score_gradient_penalty(net, x_norm, num_id, m_in, m_out, training=False)
    expected = []
    for i in range(8):  # each sample alone: its own J term
        xi = x_norm[i:i + 1]
        with tf.GradientTape() as tape:
            tape.watch(xi)
            s = losses.energy_score(net(xi, training=False)["logits"])[0]
            term = -tf.nn.relu(m_in - s) / num_id if i < num_id else tf.nn.relu(s - m_out) / (8 - num_id)
        expected.append(np.linalg.norm(tape.gradient(term, xi).numpy()))
    assert 0 < np.count_nonzero(expected) < 8
    np.testing.assert_allclose(res["grad_norms"].numpy(), expected, rtol=1e-4, atol=1e-8)


def test_penalty_in_training_mode_matches_per_sample_gradients_of_the_batch_objective():
    # BatchNorm batch statistics couple the samples: each sample's gradient is of the whole J.
    model = tiny_classifier((8, 8, 1), num_classes=3)
    net = normalized_model(model)
    x_norm = model.get_layer("normalize")(tiny_images(8, seed=3))
    m_in, m_out = _margins_splitting(net, x_norm, 4, training=True)
    res = losses.score_gradient_penalty(net, x_norm, 4, m_in, m_out, training=True)
    pieces = [x_norm[i:i + 1] for i in range(8)]
    with tf.GradientTape() as tape:
        tape.watch(pieces)
        s = losses.energy_score(net(tf.concat(pieces, 0), training=True)["logits"])
        j = losses.greg_objective(s[:4], s[4:], m_in, m_out)
    expected = [np.linalg.norm(g.numpy()) for g in tape.gradient(j, pieces)]
    np.testing.assert_allclose(res["grad_norms"].numpy(), expected, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(res["objective"].numpy(), j.numpy(), rtol=1e-5)


def test_penalty_weight_gradient_matches_finite_differences():
    model = linear_classifier((4, 4, 2), num_classes=3, seed=4)
    net = normalized_model(model)
    x_norm = model.get_layer("normalize")(tiny_images(10, (4, 4, 2), seed=5))
    m_in, m_out = _margins_splitting(net, x_norm, 6)
    kernel = model.get_layer("classifier").kernel
    with tf.GradientTape() as tape:
        penalty = losses.score_gradient_penalty(net, x_norm, 6, m_in, m_out)["penalty"]
    grad = tape.gradient(penalty, kernel).numpy()
    base = kernel.numpy()
    eps = 1e-2
    for index in [(0, 0), (5, 1), (31, 2)]:
        values = []
        for sign in (1, -1):
            w = base.copy()
            w[index] += sign * eps
            kernel.assign(w)
            values.append(float(losses.score_gradient_penalty(net, x_norm, 6, m_in, m_out)["penalty"]))
        kernel.assign(base)
        assert (values[0] - values[1]) / (2 * eps) == pytest.approx(grad[index], rel=2e-2, abs=1e-4)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("masked", ["some", "all"])
def test_penalty_weight_gradient_is_finite_with_masked_samples(masked, training):
    model = tiny_classifier((8, 8, 1), num_classes=3)
    net = normalized_model(model)
    x_norm = model.get_layer("normalize")(tiny_images(8, seed=6))
    m_in, m_out = _margins_splitting(net, x_norm, 4, training) if masked == "some" else (-1e6, 1e6)
    with tf.GradientTape() as tape:
        res = losses.score_gradient_penalty(net, x_norm, 4, m_in, m_out, training=training)
    grads = tape.gradient(res["penalty"], model.trainable_variables)
    norms = res["grad_norms"].numpy()
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    total = sum(float(tf.reduce_sum(tf.abs(g))) for g in grads)
    if masked == "all":
        assert np.all(norms == 0) and total == 0
    else:
        assert total > 0
        if not training:  # in training mode BatchNorm's batch statistics reach masked samples too
            assert 0 < np.count_nonzero(norms) < 8


def test_penalty_works_inside_tf_function():
    model = tiny_classifier((8, 8, 1), num_classes=3)
    net = normalized_model(model)
    x_norm = model.get_layer("normalize")(tiny_images(6, seed=7))
    m_in, m_out = _margins_splitting(net, x_norm, 3)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            penalty = losses.score_gradient_penalty(net, x, 3, m_in, m_out, training=False)["penalty"]
        return penalty, tape.gradient(penalty, model.trainable_variables)

    penalty, grads = step(x_norm)
    eager = losses.score_gradient_penalty(net, x_norm, 3, m_in, m_out, training=False)["penalty"]
    assert float(penalty) == pytest.approx(float(eager), rel=1e-5) and float(penalty) > 0
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_score_input_grad_norms_matches_closed_form():
    model = linear_classifier((4, 4, 2), num_classes=3, seed=8)
    net = normalized_model(model)
    x_norm = model.get_layer("normalize")(tiny_images(5, (4, 4, 2), seed=9))
    kernel, bias = model.get_layer("classifier").get_weights()
    z = x_norm.numpy().reshape(5, -1) @ kernel + bias
    softmax = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    expected = np.linalg.norm(softmax @ kernel.T, axis=1)
    np.testing.assert_allclose(losses.score_input_grad_norms(net, x_norm).numpy(), expected, rtol=1e-4)
