"""`small_cnn`: a small CPU-friendly CNN for the demo and tests (trains in seconds on 8x8 digits)."""

from __future__ import annotations

import keras

from kood.errors import ConfigError
from kood.models._checks import check_int
from kood.models.layers import GlobalAveragePool, MaxPool, ReLU, batch_norm


def small_cnn(x, num_classes: int, *, width: int = 16, depth: int = 2, blocks: int = 1):
    """Stages of [3x3 conv - BatchNorm - ReLU] x `blocks`, 2x2 max-pool between stages, global average pool.

    Stage i has `width * 2**i` channels. 8x8 inputs suit `depth <= 3`, 28x28 or 32x32 any depth up to 5.

    Args:
        x: normalized input tensor [B, H, W, C].
        num_classes: unused (the classifier head is added by `build_classifier`).
        width: channels of the first stage.
        depth: number of stages.
        blocks: conv blocks per stage.

    Returns:
        The feature tensor [B, width * 2**(depth-1)].

    Example:
        build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=10, mean=[60.0], std=[80.0], width=8)
    """
    del num_classes
    check_int("small_cnn", "width", width)
    check_int("small_cnn", "depth", depth)
    check_int("small_cnn", "blocks", blocks)
    for stage in range(depth):
        if stage > 0:
            if min(d for d in (x.shape[1], x.shape[2], 2) if d is not None) < 2:
                raise ConfigError(f"small_cnn: depth={depth} pools the input below 1x1 at stage {stage}; use a "
                                  f"smaller depth. Received: depth={depth}")
            x = MaxPool(2)(x)
        for _ in range(blocks):
            x = keras.layers.Conv2D(width * 2 ** stage, 3, padding="same", use_bias=False)(x)
            # momentum 0.9 = PyTorch's 0.1 (as in the paper models): inference statistics catch up within a short run.
            x = batch_norm(momentum=0.9, epsilon=1e-3)(x)
            x = ReLU()(x)
    return GlobalAveragePool()(x)
