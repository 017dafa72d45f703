"""kood: out-of-distribution detection by training, for Keras 3 / TensorFlow."""

__version__ = "0.1.0"
