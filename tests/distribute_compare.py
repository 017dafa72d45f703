"""Subprocess entry points of tests/test_distribute.py: MirroredStrategy over two logical CPUs.

    python -m tests.distribute_compare compare METHOD[,flag=value...] ROOT OUT.json [SYNC_BN: 0|1]
    python -m tests.distribute_compare resume METHOD ROOT OUT.json
    python -m tests.distribute_compare batchnorm_copies OUT.json

One strategy per process: collectives of a second MirroredStrategy in the same process can clash
with the first's (same instance keys, other shapes).

The CPU must be split into logical devices before TensorFlow initializes, hence a fresh process.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys

import numpy as np

def _two_cpus():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def _compare_main(method: str, root: str, out: str, sync_batchnorm: str = "1") -> None:
    """Trains `method` on one device and on MirroredStrategy over two logical CPUs; writes losses.

    `method` may carry method flags and `precision`: "greg_plus,pool_dtype=bfloat16,precision=mixed_bfloat16".
    """
    method, *pairs = method.split(",")
    overrides = dict(pair.split("=", 1) for pair in pairs)
    precision = overrides.pop("precision", "float32")
    _two_cpus()
    import keras
    import tensorflow as tf

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


def _resume_main(method: str, root: str, out: str) -> None:
    """Mirrored, per-replica BatchNorm: 2 epochs in one go vs resumed from the epoch-1 checkpoint."""
    _two_cpus()
    import keras

    from kood import run as run_lib
    from tests.train_helpers import make_digit_sets

    dirs = make_digit_sets(os.path.join(root, "data"))
    cfg = run_lib.RunConfig(model_dir=os.path.join(root, "uninterrupted"), id_data=dirs["id"], aux_data=dirs["aux"],
                            method=method, epochs=2, steps_per_epoch=8, batch_size=16, lr=0.05, deterministic=True,
                            val_split="none", strategy="mirrored", verbose=0)
    run_lib.run_training(cfg)
    resumed = os.path.join(root, "resumed")  # the state of a run killed after its first checkpoint
    shutil.copytree(cfg.model_dir, resumed)
    shutil.rmtree(os.path.join(resumed, "ckpt", "epoch-00002"))
    with open(os.path.join(resumed, "ckpt", "latest"), "w") as f:
        f.write("epoch-00001")
    for name in ("results.json", "last.keras", "best.keras"):
        os.remove(os.path.join(resumed, name))
    run_lib.run_training(dataclasses.replace(cfg, model_dir=resumed))
    weights = [keras.models.load_model(os.path.join(d, "last.keras")).get_weights() for d in (cfg.model_dir, resumed)]
    with open(out, "w") as f:
        json.dump({"max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(*weights))}, f)


def _batchnorm_copies_main(out: str) -> None:
    """Each replica's copy of a BatchNorm moving mean after one training call on other images per
    replica, before and after `kood.distribute.average_batchnorm_statistics`."""
    _two_cpus()
    import tensorflow as tf

    from kood import distribute
    from kood.models import build_classifier

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[0.0], std=[1.0])
    images = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.random.stateless_normal([4, 8, 8, 1], [ctx.replica_id_in_sync_group, 0]))
    tf.function(lambda x: strategy.run(lambda x: model(x, training=True), args=(x,)))(images)
    moving_mean = distribute._batchnorm_layers(model)[0].moving_mean
    replicas = lambda: [c.numpy().tolist() for c in moving_mean.value.values]  # noqa: E731
    result = {"before": replicas()}
    result["averaged"] = distribute.average_batchnorm_statistics(model, strategy)
    result["after"] = replicas()
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
    if sys.argv[1:2] == ["compare"] and len(sys.argv) in (5, 6):
        _compare_main(*sys.argv[2:])
    elif sys.argv[1:2] == ["resume"] and len(sys.argv) == 5:
        _resume_main(*sys.argv[2:])
    elif sys.argv[1:2] == ["batchnorm_copies"] and len(sys.argv) == 3:
        _batchnorm_copies_main(sys.argv[2])
    else:
        sys.exit("usage: python -m tests.distribute_compare compare METHOD ROOT OUT.json [SYNC_BN: 0|1]\n"
                 "       python -m tests.distribute_compare resume METHOD ROOT OUT.json\n"
                 "       python -m tests.distribute_compare batchnorm_copies OUT.json")
