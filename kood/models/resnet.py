"""`resnet18`: ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) or the ImageNet stem."""

from __future__ import annotations

import keras

from kood.models._checks import check_choice, check_int
from kood.models.layers import GlobalAveragePool, ReLU, batch_norm


def _conv_bn(x, filters: int, kernel: int, stride: int):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
    return batch_norm(momentum=0.9, epsilon=1e-5)(x)


def _basic_block(x, filters: int, stride: int):
    shortcut = x
    y = ReLU()(_conv_bn(x, filters, 3, stride))
    y = _conv_bn(y, filters, 3, 1)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride)
    return ReLU()(keras.layers.Add()([y, shortcut]))


def resnet18(x, num_classes: int, *, stem: str = "cifar", width: int = 64):
    """ResNet-18 (4 stages of 2 basic blocks, widths width*[1, 2, 4, 8]) up to global average pooling.

    Args:
        x: normalized input tensor [B, H, W, C].
        num_classes: unused (the head is added by `build_classifier`).
        stem: "cifar" (3x3 stride-1 conv, no max-pool; for 32x32 inputs, as in the SIO paper) or
            "imagenet" (7x7 stride-2 conv + 3x3 max-pool; the GReg code used it even on CIFAR).
        width: channels of the first stage (64 in the paper; smaller for tests).

    Returns:
        The feature tensor [B, 8 * width].

    Example:
        build_classifier("resnet18", input_shape=(32, 32, 3), num_classes=10, mean=[125.3] * 3, std=[63.0] * 3)
    """
    del num_classes
    check_choice("resnet18", "stem", stem, ("cifar", "imagenet"))
    check_int("resnet18", "width", width)
    if stem == "cifar":
        x = ReLU()(_conv_bn(x, width, 3, 1))
    else:
        x = ReLU()(_conv_bn(x, width, 7, 2))
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same")(x)
    for stage, filters in enumerate([width, 2 * width, 4 * width, 8 * width]):
        x = _basic_block(x, filters, 1 if stage == 0 else 2)
        x = _basic_block(x, filters, 1)
    return GlobalAveragePool()(x)
