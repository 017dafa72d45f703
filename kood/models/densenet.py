"""`densenet_bc_100` (DenseNet-BC, depth 100, growth 12; CIFAR) and `densenet121` (keras.applications)."""

from __future__ import annotations

import keras

from kood.errors import ConfigError
from kood.models._checks import check_choice, check_int, check_rate
from kood.models.layers import GlobalAveragePool, ReLU, batch_norm


def _bn_relu(x):
    return ReLU()(batch_norm(momentum=0.9, epsilon=1e-5)(x))


def _conv(x, filters: int, kernel: int):
    return keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False)(x)


def densenet_bc(x, num_classes: int, *, depth: int = 100, growth: int = 12, reduction: float = 0.5,
                dropout: float = 0.0):
    """DenseNet-BC for 32x32 inputs (3 dense blocks of bottleneck layers) up to global average pooling.

    The GReg paper calls depth 100 / growth 12 "DenseNet-101" (features: 342 channels).

    Args:
        x: normalized input tensor [B, H, W, C].
        num_classes: unused (the head is added by `build_classifier`).
        depth: 6n + 4 (n bottleneck layers per block).
        growth: growth rate k.
        reduction: channel compression of the transition layers.
        dropout: dropout after each conv (0 in the papers).

    Example:
        build_classifier("densenet_bc_100", input_shape=(32, 32, 3), num_classes=10, mean=[125.3] * 3,
                         std=[63.0] * 3)
    """
    del num_classes
    check_int("densenet_bc_100", "depth", depth, minimum=10)
    check_int("densenet_bc_100", "growth", growth)
    dropout = check_rate("densenet_bc_100", "dropout", dropout)
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0 < reduction <= 1:
        raise ConfigError(f"densenet_bc_100: `reduction` must be in (0, 1]. Received: reduction={reduction!r}")
    if (depth - 4) % 6:
        raise ConfigError(f"densenet_bc_100: `depth` must be 6n + 4 (e.g. 40, 100). Received: depth={depth}")
    n = (depth - 4) // 6

    def drop(t):
        return keras.layers.Dropout(dropout)(t) if dropout > 0 else t

    channels = 2 * growth
    x = _conv(x, channels, 3)
    for block in range(3):
        for _ in range(n):
            y = drop(_conv(_bn_relu(x), 4 * growth, 1))
            y = drop(_conv(_bn_relu(y), growth, 3))
            x = keras.layers.Concatenate()([x, y])
            channels += growth
        if block < 2:
            channels = int(channels * reduction)
            x = drop(_conv(_bn_relu(x), channels, 1))
            x = keras.layers.AveragePooling2D(2)(x)
    x = _bn_relu(x)
    return GlobalAveragePool()(x)


def densenet121(x, num_classes: int, *, weights: str = "none"):
    """keras.applications.DenseNet121 (no top, average pooling) as one nested layer; ImageNet-size inputs.

    With `weights="imagenet"` Keras downloads the ImageNet weights once (needs internet) into
    ~/.keras/models. Those weights expect torch-style preprocessing, which the model's `normalize` layer
    reproduces when built with mean=[123.675, 116.28, 103.53] and std=[58.395, 57.12, 57.375] (pixel units).

    Args:
        x: normalized input tensor [B, H, W, 3], H and W >= 32 (224 for ImageNet).
        num_classes: unused (the head is added by `build_classifier`).
        weights: "none" (random init) or "imagenet".

    Example:
        build_classifier("densenet121", input_shape=(224, 224, 3), num_classes=10,
                         mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], weights="imagenet")
    """
    del num_classes
    check_choice("densenet121", "weights", weights, ("none", "imagenet"))
    if x.shape[-1] != 3 or (x.shape[1] or 32) < 32 or (x.shape[2] or 32) < 32:
        raise ConfigError(f"densenet121 needs RGB inputs of at least 32x32. Received: input_shape={tuple(x.shape[1:])}")
    try:
        base = keras.applications.DenseNet121(include_top=False, weights=None if weights == "none" else weights,
                                              input_shape=tuple(x.shape[1:]), pooling="avg")
    except Exception as e:  # keras.utils.get_file raises a bare Exception when the download fails
        if "URL fetch failure" not in str(e):
            raise
        raise ConfigError(f"densenet121: weights=imagenet are downloaded once into ~/.keras/models, and the download "
                          f"failed ({str(e).splitlines()[0][:200]}). On a machine without internet (e.g. a cluster "
                          f"node), fetch them first where there is: python -c \"import keras; "
                          f"keras.applications.DenseNet121(include_top=False, weights='imagenet')\" and copy "
                          f"~/.keras/models; or pass --arch_kwargs=weights=none") from e
    return base(x)
