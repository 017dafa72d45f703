"""tf.distribute strategies for `kood.train --strategy` (docs/distributed.md).

`make_strategy(name)` builds one of `STRATEGIES`; `WorkerRole` says whether this
process is the chief (the only writer of checkpoints, models and summaries) and
how many workers share the data. Batch sizes in kood are GLOBAL: `--batch_size=B`
on R replicas gives each replica B / R ID images (tf.distribute splits every batch).

Example:
    strategy = make_strategy("mirrored")
    role = worker_role(strategy)
    with strategy.scope():
        model = build_classifier(...)
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf

from kood.errors import ConfigError, DataError
from kood.manifest import Manifest

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's place in the run.

    Args:
        is_chief: writes checkpoints, `.keras` files, logs and results into `--model_dir`.
        task_id: index of this worker (0 when not multi-worker).
        num_workers: processes that split the data by file (1 when not multi-worker).
    """

    is_chief: bool = True
    task_id: int = 0
    num_workers: int = 1


def parse_tf_config(text: str | None) -> WorkerRole:
    """Validates a TF_CONFIG value and returns this worker's role.

    Expected form (the chief is `chief` task 0 if the cluster has one, else `worker` 0):
    `{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}`.

    Example:
        parse_tf_config(os.environ.get("TF_CONFIG"))
    """
    if not text:
        raise ConfigError('--strategy=multi_worker reads the cluster from the TF_CONFIG environment variable, which '
                          'is not set. Example: TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                          '"task": {"type": "worker", "index": 0}}\'')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}). Received: TF_CONFIG={text!r}") from e
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(f'TF_CONFIG needs a "cluster" object and a "task" object. Received: TF_CONFIG={text!r}')
    for job, addresses in cluster.items():
        if job not in ("chief", "worker", "evaluator") or not isinstance(addresses, list) or not all(
                isinstance(a, str) and ":" in a for a in addresses):
            raise ConfigError(f'TF_CONFIG cluster["{job}"] must be a list of "host:port" strings of job chief or '
                              f"worker. Received: TF_CONFIG={text!r}")
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise ConfigError(f'TF_CONFIG task must name a job of the cluster and an index into its list, e.g. '
                          f'{{"type": "worker", "index": 0}}. Received: TF_CONFIG={text!r}')
    if task_type == "evaluator":
        raise ConfigError("TF_CONFIG task type 'evaluator' is not supported by kood.train (run kood.evaluate on "
                          f"the chief's checkpoints instead). Received: TF_CONFIG={text!r}")
    has_chief = bool(cluster.get("chief"))
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)
    num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    task_id = index + (1 if has_chief and task_type == "worker" else 0)
    return WorkerRole(is_chief=chief, task_id=task_id, num_workers=num_workers)


def make_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """The tf.distribute strategy for `--strategy`.

    Args:
        name: `auto` (mirrored over all GPUs if more than one, else the default single-device strategy),
            `one_device` (first GPU, else the CPU), `mirrored` (all GPUs, else all logical CPU devices),
            `multi_worker` (MultiWorkerMirroredStrategy from TF_CONFIG) or `tpu`.
        tpu: `--tpu`, the TPU name or `grpc://` address for TPUClusterResolver ("" = local/auto-detect).

    Example:
        strategy = make_strategy("auto")
    """
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    if name == "multi_worker":
        # Before anything initializes TensorFlow's runtime (listing devices does): collective ops
        # can only be configured at startup.
        parse_tf_config(os.environ.get("TF_CONFIG"))  # a clear error before TF's own parsing
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU") if name != "tpu" else []
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:
        raise ConfigError(f"--strategy=tpu: no TPU found or reachable ({e}). Set --tpu to the TPU name or "
                          f"grpc:// address. Received: tpu={tpu!r}") from e
    return tf.distribute.TPUStrategy(resolver)


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole:
    """Chief/worker role of this process under `strategy` (TF_CONFIG for multi-worker)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return parse_tf_config(os.environ.get("TF_CONFIG"))
    return WorkerRole()


def check_batch(batch_size: int, num_replicas: int, flag: str = "batch_size") -> None:
    """Global batches are split evenly over replicas; raise if they cannot be."""
    if batch_size % num_replicas:
        raise ConfigError(f"--{flag}={batch_size} is a global batch and must be divisible by the "
                          f"{num_replicas} replicas of the strategy. Received: {flag}={batch_size}")


def check_shards(directory: str, manifest: Manifest, split: str, num_workers: int, flag: str) -> None:
    """Workers split a set by shard file (each reads files i, i + W, ...): each needs at least one."""
    shards = len(manifest.split(split, directory)["shards"])
    if shards < num_workers:
        raise DataError(f"--{flag}={directory}: split {split!r} has {shards} shard file(s) but {num_workers} "
                        f"workers read it by file; reconvert it with at least {num_workers} shards "
                        f"(data_prep --num_shards, ideally a multiple of the workers)")


def _batchnorm_layers(model: keras.Model) -> list:
    # _flatten_layers also reaches nested models (densenet121's keras.applications model).
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


def synchronize_batchnorm(model: keras.Model) -> int:
    """Makes every BatchNormalization layer use cross-replica batch statistics; returns how many.

    With it, R replicas of B / R images compute exactly the statistics one device computes on B
    (a no-op outside a strategy). Costs two all-reduces per BatchNorm layer and step.
    """
    layers = _batchnorm_layers(model)
    for layer in layers:
        layer.synchronized = True
    return len(layers)


def average_batchnorm_statistics(model: keras.Model, strategy: tf.distribute.Strategy) -> int:
    """Sets every replica's BatchNorm moving statistics to their mean over all replicas; returns how many.

    Keras keeps one copy of them per replica (aggregation "none"), each updated from that replica's
    own B / R images, so without `--sync_batchnorm` the copies drift apart and a checkpoint holds
    replica 0's alone. A resumed run then continued from other statistics than the uninterrupted one
    (GReg+'s candidate pool runs in inference mode on them). Called before every checkpoint: the
    saved statistics use every replica's images and a resumed run continues exactly. One all-reduce
    per epoch; a no-op on one replica.
    """
    variables = [v for layer in _batchnorm_layers(model) for v in (layer.moving_mean, layer.moving_variance)]
    if strategy.num_replicas_in_sync == 1 or not variables:
        return 0

    @tf.function
    def average():
        copies = strategy.run(lambda: [tf.identity(v) for v in variables])  # each replica's own copies
        for variable, copy in zip(variables, copies):
            variable.assign(strategy.reduce("MEAN", copy, axis=None))  # cross-replica: sets every copy

    average()
    return len(variables)
