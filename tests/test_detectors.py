"""Each detector's math against an independent numpy computation, each detector separating noise from
digits on a tiny trained model, and the detector interface's errors."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial.distance import cdist
from scipy.stats import entropy

from kood.detectors import DETECTORS, make_detector
from kood.detectors.ash import ash_features
from kood.detectors.dice import dice_mask, dice_score
from kood.detectors.energy import energy_score
from kood.detectors.gen import gen_score
from kood.detectors.gradnorm import gradnorm_score
from kood.detectors.kl_matching import fit_templates, kl_matching_score
from kood.detectors.knn import knn_score, l2_normalize
from kood.detectors.mahalanobis import fit_gaussians, mahalanobis_score
from kood.detectors.max_logit import max_logit_score
from kood.detectors.msp import msp_score
from kood.detectors.react import react_score
from kood.detectors.residual import residual_score
from kood.detectors.temp_scale import fit_temperature, temp_scale_score
from kood.detectors.vim import fit_vim, vim_score
from kood.errors import ConfigError
from kood.metrics import auroc
from tests.eval_helpers import digits_arrays, noise_images, outputs_of, tiny_classifier, trained_digits_model

RNG = np.random.default_rng(0)
N, D, K = 60, 12, 4
LOGITS = RNG.normal(0, 2, (N, K))
FEATURES = np.maximum(RNG.normal(0.5, 1, (N, D)), 0)  # post-ReLU-like, with exact zeros
LABELS = np.arange(N) % K
W = RNG.normal(0, 0.5, (D, K))
B = RNG.normal(0, 0.1, K)


def _softmax_row(z, t=1.0):
    e = [np.exp(v / t - max(z) / t) for v in z]
    return np.array(e) / sum(e)


def _energy_row(z, t=1.0):
    m = max(z)
    return -t * (m / t + np.log(sum(np.exp((v - m) / t) for v in z)))


def test_logit_scores_match_per_sample_math():
    for i in range(N):
        z = LOGITS[i]
        assert msp_score(LOGITS)[i] == pytest.approx(-max(_softmax_row(z)))
        assert max_logit_score(LOGITS)[i] == pytest.approx(-max(z))
        assert energy_score(LOGITS, 2.5)[i] == pytest.approx(_energy_row(z, 2.5))
        assert temp_scale_score(LOGITS, 3.0)[i] == pytest.approx(-max(_softmax_row(z, 3.0)))
        p = sorted(_softmax_row(z), reverse=True)[:3]
        assert gen_score(LOGITS, 0.1, 3)[i] == pytest.approx(sum(q ** 0.1 * (1 - q) ** 0.1 for q in p))


def test_fit_temperature_minimises_nll():
    labels = LOGITS.argmax(1)
    labels[::4] = LABELS[::4]  # mostly right, some wrong: a finite optimum inside the search bounds
    t = fit_temperature(LOGITS, labels)

    def nll(temp):
        return -np.mean([np.log(_softmax_row(LOGITS[i], temp)[labels[i]]) for i in range(N)])

    assert 0.05 < t < 100
    assert nll(t) <= nll(t * 1.2) and nll(t) <= nll(t / 1.2)


def test_react_clips_then_energy():
    clip = float(np.percentile(FEATURES, 90))
    want = [_energy_row([sum(min(FEATURES[i, d], clip) * W[d, k] for d in range(D)) + B[k] for k in range(K)])
            for i in range(N)]
    np.testing.assert_allclose(react_score(FEATURES, W, B, clip), want, rtol=1e-10)


def test_dice_keeps_top_contributions():
    sparsity = 75.0
    mask = dice_mask(W, FEATURES.mean(0), sparsity)
    contrib = (FEATURES.mean(0)[:, None] * W).ravel()
    keep = np.argsort(-contrib)[: int(round(contrib.size * (1 - sparsity / 100)))]  # no ties in random data
    want_mask = np.zeros(contrib.size)
    want_mask[keep] = 1
    np.testing.assert_array_equal(mask.ravel(), want_mask)
    want = [_energy_row(FEATURES[i] @ (W * want_mask.reshape(D, K)) + B) for i in range(N)]
    np.testing.assert_allclose(dice_score(FEATURES, W, B, mask), want, rtol=1e-10)


@pytest.mark.parametrize("variant", ["s", "p", "b"])
def test_ash_variants(variant):
    h = RNG.uniform(0, 1, (5, 20))  # distinct values: the 75th percentile keeps exactly the top 5
    out = ash_features(h, 75.0, variant)
    for i in range(5):
        top = np.argsort(-h[i])[:5]
        want = np.zeros(20)
        if variant == "p":
            want[top] = h[i, top]
        elif variant == "s":
            want[top] = h[i, top] * np.exp(h[i].sum() / h[i, top].sum())
        else:
            want[top] = h[i].sum() / 5
        np.testing.assert_allclose(out[i], want, rtol=1e-10)


@pytest.mark.parametrize("width", [16, 64, 342, 512])
def test_ash_keeps_the_reference_top_k_also_among_relu_zeros(width):
    # the paper's code: k = D - round(D * p / 100) by torch.topk; mostly-zero (ReLU) features keep k, not all D
    h = np.zeros((3, width))
    h[:, : width // 4] = RNG.uniform(0.5, 1.0, (3, width // 4))
    k = width - int(np.round(width * 0.9))
    for variant in ("s", "p", "b"):
        out = ash_features(h, 90.0, variant)
        assert (out != 0).sum(axis=1).tolist() == [k] * 3, variant
    top = np.sort(np.argsort(-h, axis=1)[:, :k], axis=1)
    np.testing.assert_array_equal(np.sort(np.nonzero(ash_features(h, 90.0, "b"))[1].reshape(3, k), axis=1), top)
    np.testing.assert_allclose(ash_features(h, 90.0, "b")[np.arange(3)[:, None], top], np.repeat(
        h.sum(1, keepdims=True) / k, k, axis=1), rtol=1e-12)


def test_knn_is_kth_neighbour_distance():
    bank_raw = RNG.normal(0, 1, (40, D))
    zq = FEATURES / np.linalg.norm(FEATURES, axis=1, keepdims=True)
    zb = bank_raw / np.linalg.norm(bank_raw, axis=1, keepdims=True)
    want = np.sort(cdist(zq, zb), axis=1)[:, 4]
    np.testing.assert_allclose(knn_score(FEATURES, l2_normalize(bank_raw), 5), want, rtol=1e-5, atol=1e-6)


def test_mahalanobis_matches_explicit_inverse():
    h = RNG.normal(0, 1, (200, 5))
    y = np.arange(200) % 3
    means, precision = fit_gaussians(h, y, 3)
    mu = [h[y == k].mean(0) for k in range(3)]
    cov = sum(np.cov((h[y == k] - mu[k]).T, bias=True) * np.sum(y == k) for k in range(3)) / 200
    inv = np.linalg.inv(cov)
    q = RNG.normal(0, 2, (10, 5))
    want = [min((q[i] - mu[k]) @ inv @ (q[i] - mu[k]) for k in range(3)) for i in range(10)]
    np.testing.assert_allclose(mahalanobis_score(q, means, precision), want, rtol=1e-8)


def test_vim_matches_reference_recipe():
    from sklearn.covariance import EmpiricalCovariance

    h_fit, z_fit = FEATURES, FEATURES @ W + B
    dim = 5
    origin, residual, alpha = fit_vim(h_fit, z_fit, W, B, dim)
    u = -np.linalg.pinv(W.T) @ B                               # the ViM code's origin
    ec = EmpiricalCovariance(assume_centered=True).fit(h_fit - u)
    vals, vecs = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray(vecs[:, np.argsort(vals * -1)[dim:]].real)
    want_alpha = z_fit.max(axis=-1).mean() / np.linalg.norm((h_fit - u) @ ns, axis=-1).mean()
    assert alpha == pytest.approx(want_alpha, rel=1e-6)
    hq = RNG.uniform(0, 2, (7, D))
    zq = hq @ W + B
    want = alpha * np.linalg.norm((hq - u) @ ns, axis=-1) - np.log(np.exp(zq).sum(1))
    np.testing.assert_allclose(vim_score(hq, zq, origin, residual, alpha), want, rtol=1e-6)


def test_residual_is_the_norm_off_the_principal_subspace():
    # independent of fit_vim: the principal subspace from an SVD of the features around ViM's origin,
    # the residual as what is left after projecting onto it (ViM paper, Sec. 3.2: ||x^{P-perp}||)
    model = tiny_classifier(hidden=D, num_classes=K)
    model.get_layer("classifier").set_weights([W.astype(np.float32), B.astype(np.float32)])  # a bias: u != 0
    w, b = (np.asarray(v, np.float64) for v in model.get_layer("classifier").get_weights())
    h_fit = FEATURES
    dim = 5
    u = -np.linalg.pinv(w.T) @ b                              # the ViM code's origin (its W is [K, D])
    _, _, vt = np.linalg.svd(h_fit - u, full_matrices=False)  # rows: principal directions, largest first
    p = vt[:dim].T
    hq = RNG.uniform(0, 2, (7, D))
    want = [np.linalg.norm((x - u) - p @ (p.T @ (x - u))) for x in hq]
    det = make_detector("residual", model, dim=dim).fit_outputs({"features": h_fit, "logits": h_fit @ w + b})
    np.testing.assert_allclose(det.score_outputs({"features": hq, "logits": hq @ w + b}), want, rtol=1e-8)
    assert det.hyperparams() == {"dim": dim}
    # the score is ViM's without the alpha-scaled energy term
    np.testing.assert_allclose(residual_score(hq, det.origin, det.residual), want, rtol=1e-8)
    with pytest.raises(ConfigError, match=rf"residual: `dim` must be in \[1, {D}\).*Received: dim={D}"):
        make_detector("residual", model, dim=D).fit_outputs({"features": h_fit, "logits": h_fit @ w + b})


def test_gradnorm_equals_autodiff_weight_gradient_norm():
    h = tf.constant(FEATURES[:8], tf.float64)
    w = tf.Variable(W)
    for i in range(8):
        with tf.GradientTape() as tape:
            z = h[i:i + 1] @ w + B
            loss = -tf.reduce_sum(tf.nn.log_softmax(z, axis=1)) / K   # KL(uniform || softmax) up to a constant
        want = -float(tf.reduce_sum(tf.abs(tape.gradient(loss, w))))
        assert gradnorm_score(FEATURES[i:i + 1], (FEATURES[i:i + 1] @ W + B))[0] == pytest.approx(want, rel=1e-8)


def test_kl_matching_templates_and_score():
    templates = fit_templates(LOGITS)
    probs = np.stack([_softmax_row(z) for z in LOGITS])
    pred = probs.argmax(1)
    for k in range(K):
        np.testing.assert_allclose(templates[k], probs[pred == k].mean(0))
    q = RNG.normal(0, 3, (6, K))
    want = [min(entropy(_softmax_row(z), templates[k]) for k in range(K)) for z in q]
    np.testing.assert_allclose(kl_matching_score(q, templates), want, rtol=1e-8)


def test_odin_perturbs_against_the_gradient():
    model = tiny_classifier(hidden=8)
    x = noise_images(6).astype(np.float32)
    t, eps = 10.0, 0.01
    xv = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xv)
        z = model(xv) / t
        loss = -tf.reduce_sum(tf.reduce_max(tf.nn.log_softmax(z, axis=1), axis=1))
    x2 = x - 255 * eps * np.sign(tape.gradient(loss, xv).numpy())
    want = -np.max(tf.nn.softmax(model(x2) / t).numpy(), axis=1)
    np.testing.assert_allclose(make_detector("odin", model, temperature=t, eps=eps).score(x), want, rtol=1e-5)
    # the perturbation raises the max softmax, so eps > 0 lowers the score
    assert np.all(want <= make_detector("odin", model, temperature=t, eps=0.0).score(x) + 1e-7)
    from kood.detectors.odin import gradient_sign

    assert gradient_sign(tf.constant([-2.0, 0.0, 3.0])).numpy().tolist() == [-1.0, 1.0, 1.0]  # the reference's 0


def test_detector_wiring_equals_pure_functions():
    model = tiny_classifier(hidden=D, num_classes=K)
    w, b = (np.asarray(v, np.float64) for v in model.get_layer("classifier").get_weights())
    outputs = {"logits": FEATURES @ w + b, "features": FEATURES, "labels": LABELS}
    det = make_detector("react", model, percentile=80).fit_outputs(outputs)
    np.testing.assert_allclose(det.score_outputs(outputs), react_score(FEATURES, w, b, np.percentile(FEATURES, 80)))
    det = make_detector("dice", model, sparsity=70).fit_outputs(outputs)
    np.testing.assert_allclose(det.score_outputs(outputs), dice_score(FEATURES, w, b, dice_mask(w, FEATURES.mean(0), 70)))
    x = noise_images(5, seed=4).astype(np.float32)
    out = outputs_of(model, x)
    np.testing.assert_allclose(make_detector("energy", model).score(x), energy_score(out["logits"]), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# On a tiny trained model: every detector separates uniform noise from digits


@pytest.fixture(scope="module")
def trained():
    model = trained_digits_model()
    x_train, y_train, x_test, _ = digits_arrays()
    fit = tf.data.Dataset.from_tensor_slices((x_train.astype(np.float32), y_train)).batch(256)
    return model, fit, x_test.astype(np.float32), noise_images(200).astype(np.float32)


AUROC_BOUND = 0.85  # all detectors reach >= 0.88 on this pair (temp_scale is the weakest, ~0.89)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_separates_noise(trained, name):
    model, fit, x_id, x_ood = trained
    det = make_detector(name, model, **({"k": 10} if name == "knn" else {}))
    det.fit(fit)
    s_id, s_ood = det.score(x_id), det.score(x_ood)
    assert s_id.shape == (len(x_id),) and np.all(np.isfinite(s_id))
    assert auroc(s_id, s_ood) > AUROC_BOUND


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_detector_lists_known():
    with pytest.raises(ConfigError, match="Known: .*'energy'.*Received: detector='enrgy'"):
        make_detector("enrgy", tiny_classifier())


@pytest.mark.parametrize("name", [n for n, c in DETECTORS.items() if c.needs_fit])
def test_fit_detectors_need_fit_data(name):
    det = make_detector(name, tiny_classifier())
    with pytest.raises(ConfigError, match="fit"):
        det.score(noise_images(3).astype(np.float32))
    with pytest.raises(ConfigError, match="needs ID fit data"):
        det.fit(None)


def test_labels_required_and_bad_hyperparameters():
    model = tiny_classifier()
    unlabelled = tf.data.Dataset.from_tensor_slices(noise_images(20).astype(np.float32)).batch(8)
    with pytest.raises(ConfigError, match="labelled"):
        make_detector("mahalanobis", model).fit(unlabelled)
    with pytest.raises(ConfigError, match="temperature"):
        make_detector("energy", model, temperature=0)
    with pytest.raises(ConfigError, match="percentile"):
        make_detector("react", model, percentile=100)
    with pytest.raises(ConfigError, match="variant"):
        make_detector("ash", model, variant="x")
    with pytest.raises(ConfigError, match=r"knn: bad hyperparameter .*knn takes \['k'\] \(see kood.detectors.knn\)"):
        make_detector("knn", model, kk=3)
    with pytest.raises(ConfigError, match="k"):
        make_detector("knn", model, k=100).fit(unlabelled)


@pytest.mark.parametrize("name", ["energy", "odin"])  # the shared path and odin's own
def test_images_of_the_wrong_shape_are_named(name):
    model = tiny_classifier()  # takes (8, 8, 1)
    for shape in ((2, 8, 8), (8, 8, 1), (2, 8, 8, 3)):
        with pytest.raises(ConfigError, match=rf"{name} expects images of shape \(8, 8, 1\) .*Received: shape "
                                              rf"{re.escape(str(shape))}"):
            make_detector(name, model).score(np.zeros(shape, np.float32))


def test_fit_images_of_the_wrong_shape_are_named():
    flat = tf.data.Dataset.from_tensor_slices((np.zeros((4, 8, 8), np.float32), np.zeros(4, np.int64))).batch(2)
    with pytest.raises(ConfigError, match=r"fit knn expects images of shape \(8, 8, 1\) .*Received: shape \(2, 8, 8\)"):
        make_detector("knn", tiny_classifier(), k=1).fit(flat)


def test_not_a_kood_classifier():
    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ConfigError, match="not a kood classifier"):
        make_detector("msp", plain)


@pytest.mark.parametrize("name", ["mahalanobis", "odin"])  # a fitted detector on outputs, and odin's own path
def test_fit_and_score_take_arrays_and_datasets_as_keras_fit_does(name):
    model = tiny_classifier()
    x = noise_images(20).astype(np.float32)
    y = np.arange(20) % model.output_shape[-1]  # every class, for mahalanobis' class means
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    reference = make_detector(name, model).fit(batched)
    expected = np.concatenate([reference.score(x[i:i + 8]) for i in range(0, 20, 8)])
    det = make_detector(name, model).fit((x, y))  # arrays, as keras.Model.fit(x, y) takes them
    np.testing.assert_allclose(det.score(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(det.score(batched), expected, rtol=1e-5, atol=1e-5)  # a dataset of (x, y)
    np.testing.assert_allclose(det.score(batched.map(lambda a, b: a)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=f"{name}: the dataset to score yielded no batches"):
        det.score(batched.take(0))


def test_uint8_images_as_tfds_gives_them():
    # tfds and a uint8 numpy array give uint8 pixels: a uint8 tf.Tensor batch was refused by
    # tf.convert_to_tensor(..., tf.float32) ("Tensor conversion requested dtype float32 for ... uint8")
    model = tiny_classifier()
    x = noise_images(20).astype(np.uint8)
    y = np.arange(20) % model.output_shape[-1]
    expected_det = make_detector("mahalanobis", model).fit((x.astype(np.float32), y))
    expected = expected_det.score(x.astype(np.float32))
    det = make_detector("mahalanobis", model).fit((x, y))  # uint8 arrays
    np.testing.assert_allclose(det.score(x), expected, rtol=1e-5, atol=1e-5)
    uint8_batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # as tfds yields them
    np.testing.assert_allclose(det.score(uint8_batches), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(make_detector("mahalanobis", model).fit(uint8_batches).score(x), expected,
                               rtol=1e-5, atol=1e-5)


def test_losses_take_numpy_images_and_refuse_a_non_positive_temperature():
    from kood import losses
    from kood.models import normalized_model

    net = normalized_model(tiny_classifier())
    x = noise_images(4).astype(np.float64) / 255.0
    norms = losses.score_input_grad_norms(net, x)
    np.testing.assert_allclose(norms, losses.score_input_grad_norms(net, tf.constant(x, tf.float32)), rtol=1e-6)
    res = losses.score_gradient_penalty(net, x, 2, -25.0, -7.0)
    assert res["grad_norms"].shape == (4,)
    with pytest.raises(ConfigError, match="temperature must be > 0. Received: temperature=0.0"):
        losses.energy_score(tf.zeros((2, 3)), 0.0)


def test_the_pure_energy_and_softmax_refuse_a_non_positive_temperature():
    for t in (0, -1.0):
        with pytest.raises(ConfigError, match=r"energy: `temperature` must be a number > 0"):
            energy_score(LOGITS, t)
        with pytest.raises(ConfigError, match=r"softmax: `temperature` must be a number > 0"):
            temp_scale_score(LOGITS, t)
