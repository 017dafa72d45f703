"""`wrn40_2`: Wide ResNet (pre-activation), depth 40, widen factor 2, as in the GReg/Energy CIFAR code."""

from __future__ import annotations

import keras

from kood.errors import ConfigError
from kood.models._checks import check_int, check_rate
from kood.models.layers import GlobalAveragePool, ReLU, batch_norm


def _bn_relu(x):
    return ReLU()(batch_norm(momentum=0.9, epsilon=1e-5)(x))


def _conv(x, filters: int, kernel: int, stride: int):
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)


def _wide_block(x, filters: int, stride: int, dropout: float):
    pre = _bn_relu(x)
    equal = x.shape[-1] == filters and stride == 1
    # As in the reference WRN: a projecting block's shortcut starts from the pre-activation.
    shortcut = x if equal else _conv(pre, filters, 1, stride)
    y = _conv(pre, filters, 3, stride)
    y = _bn_relu(y)
    if dropout > 0:
        y = keras.layers.Dropout(dropout)(y)
    y = _conv(y, filters, 3, 1)
    return keras.layers.Add()([y, shortcut])


def wide_resnet(x, num_classes: int, *, depth: int = 40, widen: int = 2, dropout: float = 0.0):
    """WRN-depth-widen up to global average pooling (features: 64 * widen channels).

    Args:
        x: normalized input tensor [B, H, W, C].
        num_classes: unused (the head is added by `build_classifier`).
        depth: 6n + 4 (40 in the papers).
        widen: widen factor (2 in the papers).
        dropout: dropout rate inside each block (the papers use 0 or 0.3).

    Example:
        build_classifier("wrn40_2", input_shape=(32, 32, 3), num_classes=10, mean=[125.3] * 3, std=[63.0] * 3,
                         dropout=0.3)
    """
    del num_classes
    check_int("wrn40_2", "depth", depth, minimum=10)
    check_int("wrn40_2", "widen", widen)
    dropout = check_rate("wrn40_2", "dropout", dropout)
    if (depth - 4) % 6:
        raise ConfigError(f"wrn40_2: `depth` must be 6n + 4 (e.g. 16, 28, 40). Received: depth={depth}")
    n = (depth - 4) // 6
    x = _conv(x, 16, 3, 1)
    for stage, filters in enumerate([16 * widen, 32 * widen, 64 * widen]):
        for i in range(n):
            x = _wide_block(x, filters, 2 if stage > 0 and i == 0 else 1, dropout)
    x = _bn_relu(x)
    return GlobalAveragePool()(x)
