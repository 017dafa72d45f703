"""Architecture registry and classifier assembly (design.md "Models").

Every classifier is a functional Keras model
`float32 pixels [B, H, W, C] -> normalize -> architecture -> features -> classifier (logits [B, K])`,
built from stock Keras layers plus subclasses with fast exact second derivatives (GReg's double
backprop) or faster kernels in `kood.models.layers`: `FusedBatchNorm` (a BatchNormalization on TF's
fused kernels), `MaxPool` (small_cnn's pooling), `ReLU`, `GlobalAveragePool` and `Normalization` (the
input normalization). They are registered as "kood>..." serializables, so `keras.models.load_model`
needs no custom objects once `kood.models` is imported.
Weight decay is the optimizer's job (`weight_decay=`): no kernel regularizers here.

Example:
    model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=10, mean=[60.0], std=[80.0])
    net = normalized_model(model)     # normalized input -> {"logits", "features"}, same weights
"""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Callable, Sequence

import keras
import numpy as np

from kood.errors import ConfigError, DataError
from kood.models.densenet import densenet121, densenet_bc
from kood.models.layers import Normalization
from kood.models.resnet import resnet18
from kood.models.small_cnn import small_cnn
from kood.models.wide_resnet import wide_resnet

# builder(normalized_inputs, num_classes, **kwargs) -> penultimate feature tensor [B, D]
ARCHITECTURES: dict[str, Callable] = {
    "small_cnn": small_cnn,          # width=16, depth=2, blocks=1; demo and tests
    "resnet18": resnet18,            # stem="cifar"|"imagenet", width=64
    "wrn40_2": wide_resnet,          # depth=40, widen=2, dropout=0.0 (paper: 0 or 0.3)
    "densenet_bc_100": densenet_bc,  # depth=100, growth=12, reduction=0.5, dropout=0.0
    "densenet121": densenet121,      # weights="none"|"imagenet" (download), ImageNet-size inputs
}

REQUIRED_LAYERS = ("normalize", "features", "classifier")
# float32, or mixed bfloat16 (float32 weights and statistics; bfloat16 has float32's exponent range, so no
# loss scaling). float16 would need loss scaling of the loss and of the GReg penalty's inner gradient: not done.
PRECISIONS = ("float32", "mixed_bfloat16")
# Phrases of the Keras warnings emitted when a saved file is loaded only in part.
_PARTIAL_LOAD_HINTS = ("Skipping", "freshly-initialized", "could not be loaded", "mismatch")


def build_classifier(arch: str, *, input_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                     std: Sequence[float], precision: str = "float32", **arch_kwargs) -> keras.Model:
    """Builds `pixels -> normalize -> arch -> features -> classifier` (logits).

    Args:
        arch: a key of `ARCHITECTURES`.
        input_shape: (H, W, C) of the float32 pixel input (0..255).
        num_classes: number of logits K.
        mean: per-channel mean in pixel units (len C), e.g. the manifest's `mean`.
        std: per-channel std in pixel units (len C), all > 0.
        precision: "float32", or "mixed_bfloat16": the architecture's layers compute in bfloat16
            (float32 weights, cast on use); normalization, features and logits stay float32.
        **arch_kwargs: options of the architecture's builder (see its docstring).

    Returns:
        A functional keras.Model with layers named "normalize", "features" and "classifier".

    Example:
        model = build_classifier("resnet18", input_shape=(32, 32, 3), num_classes=10,
                                 mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7], stem="cifar")
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"Unknown architecture. Known: {sorted(ARCHITECTURES)}. Received: arch={arch!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in input_shape):
        raise ConfigError(f"`input_shape` must be (H, W, C) of positive integers. Received: input_shape={input_shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"`num_classes` must be a positive integer. Received: num_classes={num_classes!r}")
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    channels = input_shape[-1]
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ConfigError(f"`mean` and `std` need one value per channel ({channels}). "
                          f"Received: mean={mean.tolist()}, std={std.tolist()}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ConfigError(f"`std` must be finite and > 0 and `mean` finite. Received: mean={mean.tolist()}, "
                          f"std={std.tolist()}")
    if precision not in PRECISIONS:
        raise ConfigError(f"`precision` must be one of {PRECISIONS}. Received: precision={precision!r}")
    builder = ARCHITECTURES[arch]
    # Input normalization, features and logits stay float32 under a mixed policy: the GReg penalty is a
    # gradient w.r.t. the normalized input, and energies / detectors need float32 logits and features.
    inputs = keras.Input(shape=input_shape, dtype="float32", name="pixels")
    x = Normalization(mean=mean, variance=std.astype(np.float64) ** 2, name="normalize",
                                   dtype="float32")(inputs)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        features = builder(x, int(num_classes), **arch_kwargs)
    except TypeError as e:  # unknown keyword: name the architecture and its options
        raise ConfigError(f"{arch}: bad option ({e}). See kood.models.{builder.__name__}'s docstring. "
                          f"Received: arch_kwargs={arch_kwargs}") from e
    finally:
        keras.config.set_dtype_policy(previous)
    if len(features.shape) != 2:
        raise ConfigError(f"{arch} builder must return [B, D] features. Received: shape={features.shape}")
    features = keras.layers.Activation("linear", name="features", dtype="float32")(features)
    logits = keras.layers.Dense(int(num_classes), name="classifier", dtype="float32")(features)
    return keras.Model(inputs, logits, name=arch)


def model_precision(model: keras.Model) -> str:
    """The `precision` a classifier was built with: "mixed_bfloat16" if any layer computes in bfloat16.

    Example:
        model_precision(load_classifier("runs/c10_greg"))   # "float32"
    """
    # The InputLayer computes nothing and takes the global policy at build time (keras.Input has no policy
    # argument): under a global mixed_bfloat16 a float32 classifier's input layer says mixed_bfloat16.
    names = {layer.dtype_policy.name for layer in model._flatten_layers(include_self=False)
             if not isinstance(layer, keras.layers.InputLayer)}
    return "mixed_bfloat16" if "mixed_bfloat16" in names else "float32"


def _check_classifier(model: keras.Model, what: str) -> None:
    names = {layer.name for layer in model.layers}
    missing = [n for n in REQUIRED_LAYERS if n not in names]
    if missing:
        raise ConfigError(f"{what} is not a kood classifier: no layer named {missing} "
                          f"(build it with kood.models.build_classifier). Received: model={model.name!r}")


def outputs_model(model: keras.Model) -> keras.Model:
    """Raw pixels -> {"logits", "features"}, sharing `model`'s layers and weights.

    Example:
        out = outputs_model(model)(images)   # out["features"]: [B, D]
    """
    _check_classifier(model, "outputs_model(model)")
    return keras.Model(model.inputs[0], {"logits": model.get_layer("classifier").output,
                                      "features": model.get_layer("features").output}, name=f"{model.name}_outputs")


def normalized_model(model: keras.Model) -> keras.Model:
    """Normalized input (the `normalize` layer's output) -> {"logits", "features"}, same layers and weights.

    The GReg penalty differentiates w.r.t. this input. `training=True` uses batch statistics in
    BatchNorm and updates `model`'s moving averages (the layers are shared).

    Example:
        net = normalized_model(model)
        out = net(model.get_layer("normalize")(images), training=False)
    """
    _check_classifier(model, "normalized_model(model)")
    return keras.Model(model.get_layer("normalize").output,
                       {"logits": model.get_layer("classifier").output,
                        "features": model.get_layer("features").output}, name=f"{model.name}_normalized")


def non_finite_weights(model: keras.Model) -> list[str]:
    """Paths of the weights (BatchNorm statistics included) holding a NaN or an infinity."""
    return [w.path for w in model.weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(w)))]


def classifier_file(path: str) -> str:
    """The `.keras` file a classifier path names: a run dir's `best.keras`, else `path` itself."""
    path = os.path.expanduser(path)
    return os.path.join(path, "best.keras") if os.path.isdir(path) else path


def load_classifier(path: str) -> keras.Model:
    """Loads a classifier from a `.keras` file or a model dir (its `best.keras`), strictly.

    Args:
        path: a `.keras` file, or a training `--model_dir` holding `best.keras`.

    Raises:
        DataError: the file is missing or does not load completely, or is not a kood classifier.

    Example:
        model = load_classifier("kood_runs/demo")
    """
    file = classifier_file(path)
    if not os.path.isfile(file):
        where = f"model dir {path} has no best.keras" if os.path.isdir(path) else f"{path} does not exist"
        raise DataError(f"Cannot load a classifier: {where}. Received: path={path!r}")
    if not file.endswith(".keras"):
        raise DataError(f"A classifier file must be a .keras file (model.save). Received: path={file!r}")
    if not zipfile.is_zipfile(file):  # Keras would say "File not found" for a damaged file
        raise DataError(f"{file} is not a readable .keras file (not a zip archive: truncated, damaged or another "
                        f"format). Received: path={path!r}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.models.load_model(file, compile=False)
    except Exception as e:  # re-raised with the file name; the cause stays attached
        raise DataError(f"Cannot load the classifier in {file}: {type(e).__name__}: {e}") from e
    # Keras only warns when it skips part of a file (layers keep random weights): refuse that.
    partial = [str(w.message) for w in caught if any(k in str(w.message) for k in _PARTIAL_LOAD_HINTS)]
    if partial:
        raise DataError(f"The classifier in {file} loaded only partially: {partial[0]}")
    for w in caught:  # everything else is shown as usual
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        _check_classifier(model, file)
    except ConfigError as e:
        raise DataError(str(e)) from e
    bad = non_finite_weights(model)
    if bad:  # a diverged run's weights would score every image alike (NaN)
        raise DataError(f"The classifier in {file} has non-finite weights ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): it comes from a diverged run")
    return model
