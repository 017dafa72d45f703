"""Subprocess entry point of tests/test_distribute.py: one device vs MirroredStrategy over two logical CPUs.

    python -m tests.distribute_compare compare METHOD[,flag=value...] ROOT OUT.json [SYNC_BN: 0|1]

The CPU must be split into logical devices before TensorFlow initializes, hence a fresh process.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

# Subprocess entry point: `python -m tests.distribute_compare compare METHOD[,flag=value...] ROOT OUT.json SYNC_BN(0|1)`.


def _compare_main(method: str, root: str, out: str, sync_batchnorm: str = "1") -> None:
    """Trains `method` on one device and on MirroredStrategy over two logical CPUs; writes losses.

    `method` may carry method flags and `precision`: "greg_plus,pool_dtype=bfloat16,precision=mixed_bfloat16".
    """
    method, *pairs = method.split(",")
    overrides = dict(pair.split("=", 1) for pair in pairs)
    precision = overrides.pop("precision", "float32")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from kood import run as run_lib
    from kood.trainer import OODTrainer
    from tests.train_helpers import make_digit_sets

    class TwoReplicaSampler(OODTrainer):
        """One device sampling as 2 replicas do: each half of the pool for its half of the ID batch."""

        def select_outliers(self, pool, num_id, replica=None):
            half = pool.shape[0] // 2
            return tf.concat([super(TwoReplicaSampler, self).select_outliers(
                pool[r * half:(r + 1) * half], num_id // 2, replica=(r, 2)) + r * half for r in range(2)], 0)

    dirs = make_digit_sets(os.path.join(root, "data"))
    result = {}
    for name, strategy in (("one_device", "auto"), ("mirrored", "mirrored")):
        run_lib.OODTrainer = TwoReplicaSampler if name == "one_device" else OODTrainer
        cfg = run_lib.RunConfig(model_dir=os.path.join(root, name), id_data=dirs["id"], aux_data=dirs["aux"],
                                method=method, method_overrides=overrides, epochs=2, steps_per_epoch=3, batch_size=16, lr=0.05,
                                log_every=1, deterministic=True, sync_batchnorm=sync_batchnorm == "1", val_split="none",
                                strategy=strategy, precision=precision, verbose=0)
        replicas = run_lib.run_training(cfg)["replicas"]
        model = keras.models.load_model(os.path.join(cfg.model_dir, "last.keras"))
        result[name] = {"losses": _step_scalars(os.path.join(cfg.model_dir, "logs", "train"), "loss"),
                        "weights": [w.tolist() for w in model.get_weights()],
                        "replicas": replicas}
    keras.utils.set_random_seed(cfg.seed)
    initial = run_lib._build_classifier(cfg, run_lib.read_manifest(dirs["id"])).get_weights()
    one, mirrored = (result[k].pop("weights") for k in ("one_device", "mirrored"))
    result["max_weight_diff"] = max(float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in zip(one, mirrored))
    result["max_weight_change"] = max(float(np.max(np.abs(np.array(a) - b))) for a, b in zip(one, initial))
    with open(out, "w") as f:
        json.dump(result, f)


def _step_scalars(log_dir: str, tag: str) -> list[float]:
    import tensorflow as tf

    values = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return [values[k] for k in sorted(values)]


if __name__ == "__main__":
    if sys.argv[1:2] != ["compare"] or len(sys.argv) not in (5, 6):
        sys.exit("usage: python -m tests.distribute_compare compare METHOD ROOT OUT.json [SYNC_BN: 0|1]")
    _compare_main(*sys.argv[2:])
