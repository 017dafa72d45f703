"""kood: out-of-distribution detection by training, for Keras 3 / TensorFlow."""

import os
import sys as _sys

__version__ = "0.1.0"

# Before TensorFlow's import: its C++ INFO/WARNING lines (oneDNN, CUDA stubs) drown kood's output.
# Errors still show; set TF_CPP_MIN_LOG_LEVEL yourself to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Imported as the parent package of a `python -m kood.X` (or, through its import of kood, `data_prep.X`)
# module: a CLI is starting.
if _sys.argv[:1] == ["-m"]:
    import time as _time

    _CLI_STARTED = _time.perf_counter()  # before TensorFlow's import: kood.bench --budget_minutes counts from here
    from kood.errors import import_tensorflow_quietly as _import_tf
    from kood.errors import quiet_startup_interrupts as _quiet

    _quiet()
    _import_tf()  # without TF's start-up lines (a CUDA error line on machines without a GPU)

# Registers kood's Keras layers (saved as kood>Normalization, ...) and the trainer (kood>OODTrainer), so
# that after `import kood` keras.models.load_model reads models kood trained and saved trainers.
from kood.models import layers as _layers  # noqa: E402
from kood import trainer as _trainer  # noqa: E402

del _layers, _trainer  # imported for their registrations (and pyflakes sees them used)
