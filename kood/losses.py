"""Score losses of the OOD methods as pure TF functions (docs/methods.md "Energy loss", "GReg").

Conventions: energies S = -T logsumexp(logits / T), lower = more in-distribution. Batch means
over an empty part (e.g. no auxiliary samples) are 0, not NaN.

Example:
    s = energy_score(logits)
    loss = ce + 0.1 * energy_loss(s[:b], s[b:], m_in=-25.0, m_out=-7.0)
"""

from __future__ import annotations

import tensorflow as tf

from kood.errors import ConfigError


def _mean(x: tf.Tensor) -> tf.Tensor:
    """Mean that is 0 for an empty tensor (a batch without auxiliary samples)."""
    count = tf.cast(tf.size(x), x.dtype)
    return tf.reduce_sum(x) / tf.maximum(count, 1.0)


def _as_tensor(x) -> tf.Tensor:
    """Arrays (a notebook's numpy images) as float32 tensors: a tape can only watch tensors."""
    return x if tf.is_tensor(x) else tf.convert_to_tensor(x, tf.float32)


def energy_score(logits: tf.Tensor, temperature: float = 1.0) -> tf.Tensor:
    """Per-sample energy S(x) = -T * logsumexp(logits / T); lower = more in-distribution.

    Args:
        logits: [B, K] logits.
        temperature: T > 0.

    Returns:
        [B] float32 energies.

    Example:
        energy_score(tf.constant([[0.0, 0.0]]))  # -> [-log 2]
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:  # a tensor T is the caller's to check
        raise ConfigError(f"The energy temperature must be > 0. Received: temperature={temperature}")
    logits = tf.cast(logits, tf.float32)
    return -temperature * tf.reduce_logsumexp(logits / temperature, axis=-1)


def energy_loss(s_id: tf.Tensor, s_aux: tf.Tensor, m_in: float, m_out: float) -> tf.Tensor:
    """Energy-bounded loss L_S = mean_ID[relu(S_in - m_in)^2] + mean_aux[relu(m_out - S_aux)^2].

    Args:
        s_id: [B_id] energies of ID samples.
        s_aux: [B_aux] energies of auxiliary outliers.
        m_in: ID margin (GReg: -25).
        m_out: outlier margin (GReg: -7).

    Example:
        energy_loss(s[:b], s[b:], -25.0, -7.0)
    """
    return (_mean(tf.square(tf.nn.relu(s_id - m_in)))
            + _mean(tf.square(tf.nn.relu(m_out - s_aux))))


def oe_loss(logits_aux: tf.Tensor) -> tf.Tensor:
    """Outlier exposure: cross-entropy to the uniform distribution, mean over aux of -mean_k log_softmax.

    Example:
        oe_loss(logits[b:])
    """
    logits_aux = tf.cast(logits_aux, tf.float32)
    return _mean(-tf.reduce_mean(tf.nn.log_softmax(logits_aux, axis=-1), axis=-1))


def greg_objective(s_id: tf.Tensor, s_aux: tf.Tensor, m_in: float, m_out: float) -> tf.Tensor:
    """J = -mean_ID[relu(m_in - S_in)] + mean_aux[relu(S_aux - m_out)] (methods.md, GReg eq. 3).

    Its input-gradient is non-zero only where `greg_masks` is True.

    Example:
        j = greg_objective(s[:b], s[b:], -25.0, -7.0)
    """
    return -_mean(tf.nn.relu(m_in - s_id)) + _mean(tf.nn.relu(s_aux - m_out))


def energy_loss_masks(s_id: tf.Tensor, s_aux: tf.Tensor, m_in: float, m_out: float):
    """Where L_S is active: (S_in > m_in, S_aux < m_out), two boolean tensors.

    Example:
        active_id, active_aux = energy_loss_masks(s[:b], s[b:], -25.0, -7.0)
    """
    return s_id > m_in, s_aux < m_out


def greg_masks(s_id: tf.Tensor, s_aux: tf.Tensor, m_in: float, m_out: float):
    """Where J has a gradient: (S_in < m_in, S_aux > m_out), two boolean tensors.

    This is the complement of `energy_loss_masks` except at a tie (S exactly on the margin),
    where neither term has a gradient and both masks are False.

    Example:
        keep_id, keep_aux = greg_masks(s[:b], s[b:], -25.0, -7.0)
    """
    return s_id < m_in, s_aux > m_out


def grad_norm_per_sample(grads: tf.Tensor) -> tf.Tensor:
    """Flat per-sample L2 norm of `grads` [B, ...] -> [B], with gradient 0 (not NaN) at a zero row.

    Samples masked out of J have exactly zero input-gradient; sqrt's derivative there is
    infinite, so the square root only sees rows with a positive sum of squares.

    Example:
        norms = grad_norm_per_sample(tape.gradient(j, x_norm))
    """
    flat = tf.reshape(grads, [tf.shape(grads)[0], -1])
    squared = tf.reduce_sum(tf.square(flat), axis=1)
    positive = squared > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, squared, tf.ones_like(squared))),
                    tf.zeros_like(squared))


def score_gradient_penalty(net, x_norm: tf.Tensor, num_id, m_in: float, m_out: float,
                           temperature: float = 1.0, training: bool = True,
                           pixel_scale: tf.Tensor | None = None) -> dict:
    """GReg penalty: mean over ALL samples of ||dJ/dx|| with one forward pass (double backprop).

    Runs `net` on `x_norm` = [x_id; x_aux] under a nested tape watching `x_norm`, computes J from
    the energies and differentiates it w.r.t. `x_norm` with the graph kept, so calling this inside
    the caller's tape makes `penalty` differentiable w.r.t. the weights. The logits it returns are
    the ones to use for the other loss terms (no second forward pass).

    With `training=True` and BatchNorm, J also depends on every sample through the batch
    statistics, so samples outside `greg_masks` get a (small) non-zero gradient too, as in the
    reference code; with `training=False` their gradient is exactly 0.

    Args:
        net: a `normalized_model` (normalized input -> {"logits", "features"}).
        x_norm: [B, H, W, C] normalized inputs, ID samples first.
        num_id: number of ID samples (int or scalar tensor).
        m_in, m_out: energy margins (GReg: -25, -7).
        temperature: energy temperature.
        training: passed to `net` (BatchNorm batch statistics when True).
        pixel_scale: optional per-channel factor [C] applied to the gradient before the norm;
            1/std measures the norm w.r.t. raw pixels instead of the normalized input.

    Returns:
        dict(penalty [], grad_norms [B], logits [B, K], features [B, D], energies [B], objective []).

    Example:
        with tf.GradientTape() as tape:
            res = score_gradient_penalty(net, normalize(x), b, -25.0, -7.0)
            loss = ce(res["logits"][:b]) + res["penalty"]
    """
    x_norm = _as_tensor(x_norm)
    with tf.GradientTape() as inner:
        inner.watch(x_norm)
        out = net(x_norm, training=training)
        logits = tf.cast(out["logits"], tf.float32)
        energies = energy_score(logits, temperature)
        objective = greg_objective(energies[:num_id], energies[num_id:], m_in, m_out)
    grads = inner.gradient(objective, x_norm)
    if pixel_scale is not None:
        grads = grads * tf.cast(pixel_scale, grads.dtype)
    norms = grad_norm_per_sample(tf.cast(grads, tf.float32))
    return {"penalty": tf.reduce_mean(norms), "grad_norms": norms, "logits": logits,
            "features": out["features"], "energies": energies, "objective": objective}


def score_input_grad_norms(net, x_norm: tf.Tensor, temperature: float = 1.0, training: bool = False) -> tf.Tensor:
    """Per-sample ||dS(x)/dx_norm|| (paper Fig. 3): one forward and one backward pass, no double backprop.

    Samples are independent when `training=False`, so the gradient of sum(S) gives each sample's
    own dS/dx. For free during GReg training: a sample kept by `greg_masks` has
    ||dS/dx|| = grad_norms * B_part (J's 1/B_id or 1/B_aux factor), B_part its part's size.

    Example:
        norms = score_input_grad_norms(net, normalize(images))
    """
    x_norm = _as_tensor(x_norm)
    with tf.GradientTape() as tape:
        tape.watch(x_norm)
        # The sum must be taken under the tape, or the gradient is None.
        total = tf.reduce_sum(energy_score(net(x_norm, training=training)["logits"], temperature))
    return grad_norm_per_sample(tape.gradient(total, x_norm))
