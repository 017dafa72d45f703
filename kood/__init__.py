"""kood: out-of-distribution detection by training, for Keras 3 / TensorFlow."""

import os

__version__ = "0.1.0"

# Before TensorFlow's import: its C++ INFO/WARNING lines (oneDNN, CUDA stubs) drown kood's output.
# Errors still show; set TF_CPP_MIN_LOG_LEVEL yourself to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Registers kood's Keras layers (saved as kood>Normalization, ...), so that after `import kood`
# keras.models.load_model reads models kood trained.
from kood.models import layers as _layers  # noqa: E402,F401
