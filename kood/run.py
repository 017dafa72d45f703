"""One training run: data, model, optimizer, the epoch loop, checkpoints, final evaluation.

`kood.train` (the CLI) fills a `RunConfig` from flags and calls `run_training`.
Each epoch is one `fit` call on a data pipeline seeded by (seed, epoch), so a run
restarted from its last checkpoint sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from kood import checkpoint, data, distribute, losses, metrics
from kood.errors import ConfigError, DataError, check_output_dir
from kood.manifest import (ID_KINDS, fingerprint, json_text, read_json, read_manifest, read_manifest_of,
                           write_text_atomic)
from kood.methods import MethodConfig, method_config, resolve_pool_factor
from kood.models import (ARCHITECTURES, PRECISIONS, build_classifier, classifier_file, load_classifier,
                         non_finite_weights)
from kood.rundir import resolve_model
from kood.summaries import NanGuard, RunProgbar, TensorBoardLogger
from kood.trainer import OODTrainer
from kood.writer import locked_output

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "multistep", "constant")


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs; `kood.train` documents each field as a flag."""

    model_dir: str
    id_data: str
    method: str = "greg"
    method_overrides: dict = dataclasses.field(default_factory=dict)
    aux_data: str | None = None
    syn_data: str | None = None
    sio_ratio: float = 1.0
    ood_data: dict = dataclasses.field(default_factory=dict)  # name -> dataset dir, evaluated at the end
    arch: str = "small_cnn"
    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    min_lr: float = 0.0
    lr_milestones: tuple = ()
    lr_gamma: float = 0.1
    epochs: int = 10
    steps_per_epoch: int = 0  # 0: real ID train images // real images per batch
    batch_size: int = 64  # GLOBAL: split over the replicas of `strategy`
    augment: bool = True
    seed: int = 0
    init_checkpoint: str | None = None
    val_split: str = "auto"
    log_every: int = 10
    deterministic: bool = False
    jit_compile: bool = False
    precision: str = "float32"  # kood.models.PRECISIONS
    strategy: str = "auto"  # kood.distribute.STRATEGIES
    tpu: str = ""  # TPU name or grpc:// address for strategy="tpu"
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (all replicas)
    verbose: int = 1


def validate(cfg: RunConfig) -> MethodConfig:
    """Checks flags and their combinations before any work; returns the method config."""
    mcfg = method_config(cfg.method, **cfg.method_overrides)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {PRECISIONS}. Received: precision={cfg.precision!r}")
    if cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"--arch: unknown architecture. Known: {sorted(ARCHITECTURES)}. Received: arch={cfg.arch!r}")
    ranges = {"lr": (lambda v: v > 0, "> 0"),
              "min_lr": (lambda v: 0 <= v <= cfg.lr, f"in [0, --lr={cfg.lr}] (the cosine schedule's floor)"),
              "weight_decay": (lambda v: v >= 0, ">= 0"),
              "lr_gamma": (lambda v: v > 0, "> 0 (the multistep lr factor)")}
    if cfg.optimizer == "sgd":
        ranges["momentum"] = (lambda v: 0 <= v < 1, "in [0, 1)")
    for name, (in_range, bounds) in ranges.items():  # --lr first: the others' bounds use it
        value = getattr(cfg, name)
        if not (math.isfinite(value) and in_range(value)):
            raise ConfigError(f"--{name} must be a finite number {bounds}. Received: {name}={value}")
    if not 0.0 < cfg.sio_ratio <= 1.0:
        raise ConfigError(f"--sio_ratio must be in (0, 1] (1 = no synthetic data). Received: sio_ratio={cfg.sio_ratio}")
    if cfg.sio_ratio < 1.0 and not cfg.syn_data:
        raise ConfigError(f"--sio_ratio={cfg.sio_ratio} replaces part of each batch with synthetic images: "
                          "it needs --syn_data=DIR")
    if cfg.syn_data and cfg.sio_ratio == 1.0:
        raise ConfigError("--syn_data is given but --sio_ratio=1.0 would never use it; set e.g. --sio_ratio=0.8")
    if mcfg.uses_aux and not cfg.aux_data:
        raise ConfigError(f"--method={cfg.method} trains on auxiliary outliers: it needs --aux_data=DIR")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {OPTIMIZERS}. Received: optimizer={cfg.optimizer!r}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {SCHEDULES}. Received: schedule={cfg.schedule!r}")
    if cfg.schedule == "multistep" and not cfg.lr_milestones:
        raise ConfigError("--schedule=multistep needs --lr_milestones (epochs, e.g. 50)")
    if cfg.lr_milestones and cfg.schedule != "multistep":
        raise ConfigError(f"--lr_milestones applies to --schedule=multistep. Received: schedule={cfg.schedule!r}, "
                          f"lr_milestones={list(cfg.lr_milestones)}")
    milestones = list(cfg.lr_milestones)
    if milestones and (milestones != sorted(set(milestones)) or milestones[0] < 1 or milestones[-1] >= cfg.epochs):
        raise ConfigError(f"--lr_milestones must be increasing epochs between 1 and --epochs - 1 = {cfg.epochs - 1} "
                          f"(the lr drops after each). Received: lr_milestones={milestones}")
    if cfg.min_lr and cfg.schedule != "cosine":
        raise ConfigError(f"--min_lr applies to --schedule=cosine. Received: schedule={cfg.schedule!r}, "
                          f"min_lr={cfg.min_lr}")
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1. Received: {name}={getattr(cfg, name)}")
    if cfg.steps_per_epoch < 0:
        raise ConfigError(f"--steps_per_epoch must be >= 0 (0: one pass over the ID train split). "
                          f"Received: steps_per_epoch={cfg.steps_per_epoch}")
    if int(cfg.batch_size * cfg.sio_ratio) < 1:
        raise ConfigError(f"--batch_size={cfg.batch_size} x --sio_ratio={cfg.sio_ratio} leaves no real image per "
                          f"batch; use a batch size of at least {math.ceil(1 / cfg.sio_ratio)}")
    if cfg.strategy not in distribute.STRATEGIES:
        raise ConfigError(f"--strategy must be one of {distribute.STRATEGIES}. Received: strategy={cfg.strategy!r}")
    return mcfg


def make_optimizer(cfg: RunConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total, alpha=cfg.min_lr / cfg.lr)
    elif cfg.schedule == "multistep":
        # Keras' schedule keeps values[i] while step <= bounds[i]; the first step of epoch m is m * steps_per_epoch.
        bounds = [int(m) * steps_per_epoch - 1 for m in cfg.lr_milestones]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [cfg.lr * cfg.lr_gamma ** i for i in range(len(bounds) + 1)])
    else:
        lr = cfg.lr
    wd = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    return keras.optimizers.Adam(lr, weight_decay=wd)


PATH_SETTINGS = ("id_data", "aux_data", "syn_data", "init_checkpoint")


def _run_signature(cfg: RunConfig) -> dict:
    """The parts of the config that must not change when a run is resumed."""
    sig = dataclasses.asdict(cfg)
    # A run may resume on another device count (checkpoints hold plain, unreplicated values).
    # model_dir: config.json lives in it, so a moved run dir resumes.
    for volatile in ("verbose", "log_every", "ood_data", "strategy", "tpu", "model_dir"):
        sig.pop(volatile)
    sig["lr_milestones"] = list(sig["lr_milestones"])
    for name in PATH_SETTINGS:  # absolute: evaluate/export and resumes may run from another directory
        if sig[name]:
            sig[name] = os.path.abspath(os.path.expanduser(sig[name]))
    return sig


def effective_overrides(method: str, overrides: dict | None) -> dict:
    """The method flags that differ from `method`'s preset: `--method=greg --grad_weight=1` is plain greg."""
    try:
        preset = dataclasses.asdict(method_config(method))
    except ConfigError:  # a method of another kood version: compare the flags as given
        return dict(overrides or {})
    return {k: v for k, v in (overrides or {}).items() if k not in preset or preset[k] != v}


def _same_setting(name: str, saved, now) -> bool:
    """Equal settings; paths are equal when they name the same file (`data/x/`, `./data/x`, absolute;
    an --init_checkpoint run dir and its best.keras)."""
    if name in PATH_SETTINGS and saved and now:
        resolved = classifier_file if name == "init_checkpoint" else os.path.expanduser
        return os.path.realpath(resolved(saved)) == os.path.realpath(resolved(now))
    return saved == now


def _as_flags(diff: dict) -> str:
    """'with --a=1 and without --b': how to rerun with the saved side of `diff` (setting -> (saved, now))."""
    given, dropped = [], []
    for name, (saved, now) in diff.items():
        if name == "method_overrides":  # one flag per method hyperparameter
            saved, now = saved or {}, now or {}
            given += [f"--{k}={v}" for k, v in saved.items() if now.get(k) != v]
            dropped += [f"--{k}" for k in now if k not in saved]
        elif name == "arch_kwargs":
            given.append("--arch_kwargs=" + ",".join(f"{k}={v}" for k, v in (saved or {}).items()))
        elif isinstance(saved, (list, tuple)):
            given.append(f"--{name}=" + ",".join(str(v) for v in saved))
        else:
            given.append(f"--{name}={'' if saved is None else saved}")
    return " and ".join(f"{word} {' '.join(flags)}" for word, flags in (("with", given), ("without", dropped)) if flags)


def _locked(model_dir: str) -> bool:
    """Settings are locked once the run has a checkpoint: a run that stopped before its first
    checkpoint (a bad flag, a NaN in epoch 1) can be rerun with corrected settings."""
    return (os.path.exists(os.path.join(model_dir, "config.json"))
            and checkpoint.latest(os.path.join(model_dir, "ckpt")) is not None)


def _saved_settings(model_dir: str) -> dict | None:
    """The locked settings of the run in `model_dir` (defaults for settings added since), or None."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return None
    old = read_json(path, "run config")  # read even while unlocked: a corrupt file is named, not replaced
    if not _locked(model_dir):
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    return {**defaults, **old}


def settings_diff(cfg: RunConfig, saved: dict | None = None) -> dict:
    """`{setting: (saved, now)}` where `cfg` differs from the locked settings of the run in `cfg.model_dir`
    (`saved`: those settings if already read)."""
    saved = saved or _saved_settings(cfg.model_dir)
    if saved is None:
        return {}
    saved = {**saved, "method_overrides": effective_overrides(saved["method"], saved["method_overrides"])}
    sig = {**_run_signature(cfg), "method_overrides": effective_overrides(cfg.method, cfg.method_overrides)}
    return {k: (saved.get(k), v) for k, v in sig.items() if not _same_setting(k, saved.get(k), v)}


def _check_model_dir(cfg: RunConfig, data: dict, write: bool = True) -> None:
    """Refuses settings or training data that differ from the run's locked ones; the chief (`write`)
    stores them in `config.json` while nothing is trained yet (new settings replace older ones).

    `data`: flag -> `kood.manifest.fingerprint` of its set. A set converted again under the same
    path stops a resume; the same records at another path (a copy, a moved set) continue it.
    """
    check_output_dir(cfg.model_dir, "--model_dir")
    saved = _saved_settings(cfg.model_dir)
    prints = (saved or {}).get("data_fingerprints", {})  # runs from before fingerprints were recorded have none
    diff = settings_diff(cfg, saved)
    moved = [flag for flag in data if flag in diff and prints.get(flag) == data[flag]]
    for flag in moved:
        print(f"note: --{flag}={getattr(cfg, flag)} holds the same records as the run's {diff.pop(flag)[0]}: "
              f"continuing on it", file=sys.stderr)
    for flag, now in data.items():
        if flag not in diff and prints.get(flag, now) != now:
            raise DataError(f"--{flag}={getattr(cfg, flag)} holds other records than when the run in "
                            f"--model_dir={cfg.model_dir} started (the set was converted again: its manifest's "
                            f"shards differ); its checkpoints continue only on the same data: use a new "
                            f"--model_dir, or restore the data set")
    if diff:
        raise ConfigError(f"--model_dir={cfg.model_dir} holds a run with other settings "
                          f"(saved vs now: {diff}); use a new --model_dir to start another run, or rerun "
                          f"{_as_flags(diff)} to resume this one")
    if write and (moved or not _locked(cfg.model_dir)):  # evaluate/export then read the set's new path
        os.makedirs(cfg.model_dir, exist_ok=True)
        write_text_atomic(os.path.join(cfg.model_dir, "config.json"),
                          json.dumps({**_run_signature(cfg), "data_fingerprints": data}, indent=2))


def _build_classifier(cfg: RunConfig, manifest, resuming: bool = False) -> keras.Model:
    model = build_classifier(cfg.arch, input_shape=manifest.shape, num_classes=manifest.num_classes,
                             mean=manifest.mean, std=manifest.std, precision=cfg.precision, **cfg.arch_kwargs)
    if cfg.init_checkpoint and not resuming:  # a resumed run's checkpoint replaces these weights anyway
        resolve_model(cfg.init_checkpoint)  # warns if that run has not finished (e.g. a preempted CE job)
        source = load_classifier(cfg.init_checkpoint)
        mine, theirs = model.weights, source.weights
        ours = _arch_flags(cfg.arch, cfg.arch_kwargs)
        if len(mine) != len(theirs):
            raise ConfigError(f"--init_checkpoint={cfg.init_checkpoint} has {len(theirs)} weights, {ours} has "
                              f"{len(mine)}: not the same architecture{_trained_with(cfg.init_checkpoint)}")
        for a, b in zip(mine, theirs):
            if tuple(a.shape) != tuple(b.shape):
                raise ConfigError(f"--init_checkpoint={cfg.init_checkpoint}: weight {b.path} has shape "
                                  f"{tuple(b.shape)}, {ours} expects {tuple(a.shape)} at {a.path}"
                                  f"{_trained_with(cfg.init_checkpoint)}")
        model.set_weights(source.get_weights())
    return model


def _arch_flags(arch, kwargs: dict) -> str:
    return f"--arch={arch}" + (f" --arch_kwargs={','.join(f'{k}={v}' for k, v in kwargs.items())}" if kwargs else "")


def _trained_with(init_checkpoint: str) -> str:
    """'; its run (...) used --arch=...' from the config.json beside the checkpoint, if there is one."""
    path = os.path.expanduser(init_checkpoint)
    config = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    try:
        saved = read_json(config, "run config")
    except DataError:
        return ""
    return f"; its run ({config}) used {_arch_flags(saved.get('arch'), saved.get('arch_kwargs') or {})}"


def _describe(cfg: RunConfig, mcfg: MethodConfig, manifest, steps: int, aux_batch: int, epoch: int,
              num_aux: int | None = None) -> str:
    """What is about to run, in two lines: the method's resolved flags, then model, data and schedule."""
    settings = ", ".join(f"{k}={v}" for k, v in mcfg.used().items())
    aux = f" + {aux_batch} auxiliary" if mcfg.uses_aux else ""
    if mcfg.uses_aux and mcfg.sampler == "energy_cluster":
        # methods.md's pool is N_aux / N_id x B (every auxiliary image once per epoch); say how far the flag is
        ratio = num_aux / manifest.count("train") if num_aux else None
        auto = cfg.method_overrides.get("pool_factor") == "auto"
        rule = "" if ratio is None else (" (--pool_factor=auto: " if auto else " (") + (
            f"the paper's rule N_aux / N_id {'is' if auto else 'would be'} {ratio:.3g}") + (
            ", below the minimum 2: GReg+ picks 2 x B)" if ratio < 2 else ")")
        aux = f" + {2 * cfg.batch_size} auxiliary chosen from {aux_batch} candidates{rule}"
    synthetic = cfg.batch_size - int(cfg.batch_size * cfg.sio_ratio)  # kood.data's split of each batch
    sio = (f" ({synthetic} of them synthetic, {synthetic / cfg.batch_size:.0%}, from {cfg.syn_data})"
           if cfg.sio_ratio < 1 else "")
    start = f"from epoch {epoch + 1} " if epoch else ""
    init = f", starting from {cfg.init_checkpoint}" if cfg.init_checkpoint and not epoch else ""
    return (f"method {cfg.method}: {settings}\n"
            f"{cfg.arch} ({cfg.precision}) on {manifest.count('train')} {cfg.id_data} train images: "
            f"{steps} steps/epoch x {cfg.epochs} epochs {start}of {cfg.batch_size} ID images{sio}{aux}, "
            f"{cfg.optimizer} lr {cfg.lr} ({cfg.schedule}){init}; run dir {cfg.model_dir}")


def _val_split(cfg: RunConfig, manifest) -> str | None:
    if cfg.val_split == "none":
        return None
    if cfg.val_split != "auto":
        manifest.split(cfg.val_split, f"--val_split: --id_data={cfg.id_data}")  # DataError naming the splits
        return cfg.val_split
    for name in ("val", "validation", "test"):
        if name in manifest.splits:
            return name
    return None


def _epoch_data(cfg: RunConfig, trainer: OODTrainer, epoch: int, aux_shape, strategy: tf.distribute.Strategy,
                num_workers: int = 1):
    """One epoch's (ID, aux) batches. Several workers: one input pipeline each, on its own shard files."""
    if num_workers == 1:  # the strategy splits every global batch over the local replicas
        return _pipeline(cfg, trainer, epoch, aux_shape, cfg.batch_size)

    def per_worker(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return _pipeline(cfg, trainer, epoch, aux_shape, ctx.get_per_replica_batch_size(cfg.batch_size),
                         (ctx.num_input_pipelines, ctx.input_pipeline_id))

    return strategy.distribute_datasets_from_function(per_worker)


def _pipeline(cfg: RunConfig, trainer: OODTrainer, epoch: int, aux_shape, batch_size: int,
              file_shard: tuple[int, int] | None = None) -> tf.data.Dataset:
    seed = cfg.seed * 100_003 + epoch
    if file_shard:  # workers draw their own shuffles and augmentations
        seed += 1_000_003 * file_shard[1]
    id_ds, _ = data.train_dataset(cfg.id_data, batch_size=batch_size, augment=cfg.augment, seed=seed,
                                  syn_directory=cfg.syn_data, sio_ratio=cfg.sio_ratio, file_shard=file_shard)
    if not trainer.config.uses_aux:
        return id_ds
    aux = data.outlier_stream(cfg.aux_data, batch_size=trainer.aux_batch_size(batch_size), augment=cfg.augment,
                              seed=seed, image_shape=aux_shape, file_shard=file_shard)
    return tf.data.Dataset.zip((id_ds, aux))


def _validate(model: keras.Model, directory: str, split: str) -> dict:
    """Accuracy and CE of one split, computed by this process alone (no collectives, no data
    sharding): every worker gets the same exact numbers, whatever the strategy."""
    correct, ce, count = 0, 0.0, 0
    for images, labels in data.eval_dataset(directory, split, batch_size=256):
        logits = model(images, training=False)
        correct += int(np.sum(np.argmax(logits, -1) == labels.numpy()))
        ce += float(tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
        count += len(labels)
    return {"val_accuracy": correct / count, "val_ce": ce / count}


def _scores(model: keras.Model, directory: str, split: str, temperature: float, batch_size: int = 256):
    energies, correct = [], []
    for images, labels in data.eval_dataset(directory, split, batch_size=batch_size):
        logits = model(images, training=False)
        energies.append(losses.energy_score(logits, temperature).numpy())
        correct.append((np.argmax(logits, -1) == labels.numpy()))
    return np.concatenate(energies), np.concatenate(correct)


def _selects_best(cfg: RunConfig, manifest) -> bool:
    """Whether a validation split picks best.keras. `auto` never picks it with the split the final
    evaluation reports on (that would select on the test set): it only monitors that split."""
    split = _val_split(cfg, manifest)
    return split is not None and not (cfg.val_split == "auto" and split == _eval_split(cfg, manifest))


def _selection_note(cfg: RunConfig, manifest) -> str:
    """How best.keras is picked, said before training (it decides which epoch the results are)."""
    split, reported = _val_split(cfg, manifest), _eval_split(cfg, manifest)
    if _selects_best(cfg, manifest):
        caveat = ("; the final metrics are on that same split, so they are optimistic" if split == reported else
                  f"; the final metrics are on the {reported} split")
        return f"note: best.keras is the epoch with the best {split} accuracy{caveat}"
    if split is None:
        return "note: best.keras is the last epoch (no val split, --val_split=none, or no held-out split at all)"
    return (f"note: best.keras is the last epoch: the {split} split is the one the final evaluation reports on, "
            f"so it is only monitored (pass --val_split={split} to pick with it anyway)")


def _eval_split(cfg: RunConfig, manifest) -> str | None:
    """The ID split the final OOD evaluation uses."""
    return "test" if "test" in manifest.splits else _val_split(cfg, manifest)


def final_evaluation(model: keras.Model, cfg: RunConfig, mcfg: MethodConfig, manifest) -> dict:
    """ID accuracy on the held-out split (test, else val) and energy-score OOD metrics of each `cfg.ood_data` set."""
    split = _eval_split(cfg, manifest)
    if split is None:
        return {}
    s_id, correct = _scores(model, cfg.id_data, split, mcfg.temperature)
    results = {"id_split": split, "id_accuracy": float(correct.mean()), "score": "energy",
               "fpr_convention": "ID positive (share of OOD accepted at 95% ID TPR)", "ood": {}}
    for name, directory in cfg.ood_data.items():
        split = ood_split(read_manifest(directory))
        s_ood, _ = _scores(model, directory, split, mcfg.temperature)
        results["ood"][name] = dict(metrics.ood_metrics(s_id, s_ood), split=split, count=len(s_ood))
    return results


def ood_split(manifest) -> str:
    """The split of an `--ood_data` set the final evaluation scores: test, else its first."""
    return "test" if "test" in manifest.splits else next(iter(manifest.splits))


def _conversion_hint(shape: tuple, wanted: tuple) -> str:
    """What to convert again so that images of `shape` become `wanted`: the size, the channels, or both."""
    parts = (["size (data_prep --image_size)"] if shape[:2] != wanted[:2] else []) + \
            (["channels (data_prep --channels)"] if shape[2] != wanted[2] else [])
    return " and ".join(parts)


def format_results(results: dict) -> str:
    """The final evaluation in percentages, as kood.evaluate and kood.bench print it (results.json holds fractions)."""
    if "id_accuracy" not in results:
        return "(no held-out ID split: no final evaluation)"
    lines = [f"ID accuracy ({results['id_split']} split): {100 * results['id_accuracy']:.2f}%"]
    if not results["ood"]:
        return "\n".join(lines + ["(no OOD evaluation: pass --ood_data=name=DIR)"])
    lines += [f"OOD score: {results['score']}; FPR95 convention: {results['fpr_convention']}",
              "| OOD set | FPR95 % ↓ | AUROC % ↑ | AUPR-In % ↑ | AUPR-Out % ↑ |", "|---|---|---|---|---|"]
    for name, m in results["ood"].items():
        name += f" ({m['split']} split)" if m.get("split", "test") != "test" else ""
        lines.append(f"| {name} | " + " | ".join(f"{100 * m[k]:.2f}" for k in ("fpr95", "auroc", "aupr_in", "aupr_out"))
                     + " |")
    return "\n".join(lines)


def _keras_files(classifier: keras.Model, out_dir: str, state: dict) -> None:
    """Writes last.keras (the checkpoint's weights) and, if its epoch is the best so far, best.keras."""
    _save_atomic(classifier, os.path.join(out_dir, "last.keras"))
    if state.get("best_epoch") == state["epoch"]:
        _save_atomic(classifier, os.path.join(out_dir, "best.keras"))


def _diverged(model: keras.Model, record: dict) -> str | None:
    """What the per-step loss guard can miss: non-finite weights (BatchNorm statistics included) or a
    non-finite validation loss. Checked before an epoch is saved, so a checkpoint is always finite."""
    bad = non_finite_weights(model)
    if bad:
        return f"non-finite weights after the epoch ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    if not np.isfinite(record.get("val_ce", 0.0)):
        return "non-finite validation cross-entropy after the epoch"
    return None


def _best_epoch(history: list[dict]) -> int:
    """The epoch best.keras holds in a checkpoint written before `best_epoch` was recorded."""
    if not history or "val_accuracy" not in history[-1]:
        return history[-1]["epoch"] if history else 0
    return max(history, key=lambda r: (r["val_accuracy"], -r["epoch"]))["epoch"]


def _save_atomic(model: keras.Model, path: str) -> None:
    """A killed run never leaves a truncated `.keras` file under the final name."""
    tmp = path[: -len(".keras")] + ".partial.keras"
    try:
        model.save(tmp)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. a full disk: do not leave the partial file taking space
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def check_aux_size(mcfg: MethodConfig, batch_size: int, num_aux: int, num_id: int, aux_data: str) -> MethodConfig:
    """`mcfg` with `pool_factor="auto"` resolved; a ConfigError if one step needs more auxiliary images than
    the `num_aux` train images of `aux_data` (a batch would repeat images, and a huge one hangs).

    kood.bench calls it for every method before its CE pretraining, so that this comes before any work.

    Example:
        check_aux_size(method_config("greg_plus"), 64, 360, 867, "demo/aux")  # ConfigError: pool of 384 images
    """
    mcfg = resolve_pool_factor(mcfg, num_aux, num_id)
    if mcfg.aux_batch_size(batch_size) > num_aux:
        what = ("GReg+ candidate pool (--pool_factor x --batch_size)" if mcfg.sampler == "energy_cluster"
                else "auxiliary batch (--aux_batch_factor x --batch_size)")
        raise ConfigError(f"The {what} is {mcfg.aux_batch_size(batch_size)} images, more than the {num_aux} "
                          f"train images of --aux_data={aux_data}; lower it or use a larger auxiliary set")
    return mcfg


def run_training(cfg: RunConfig) -> dict:
    """Trains (or resumes, or finds finished) the run in `cfg.model_dir`; returns final metrics.

    Model, optimizer and trainer are built under `cfg.strategy`'s scope (`kood.distribute`).
    Only the chief writes into `model_dir`; other workers write to a temporary directory that
    is deleted at the end, and every worker resumes from the chief's checkpoints (so with
    several machines `model_dir` must be shared storage).
    """
    mcfg = validate(cfg)
    manifest = read_manifest_of("--id_data=", cfg.id_data)
    if manifest.kind not in ID_KINDS:
        raise DataError(f"--id_data={cfg.id_data} holds a set of kind {manifest.kind!r} (its manifest.json); ID "
                        f"training data must be of kind 'real' (or 'synthetic')")
    if manifest.num_classes < 2:
        raise DataError(f"--id_data={cfg.id_data} has {manifest.num_classes} classes; a classifier needs >= 2")
    manifest.split("train", f"--id_data={cfg.id_data}")  # DataError naming the splits it has
    inputs = {"id_data": (cfg.id_data, manifest)}
    if cfg.aux_data and not mcfg.uses_aux and cfg.verbose:
        print(f"note: --method={cfg.method} trains without auxiliary outliers: --aux_data={cfg.aux_data} is not used",
              file=sys.stderr)
    if cfg.aux_data and os.path.realpath(cfg.aux_data) == os.path.realpath(cfg.id_data):
        raise ConfigError(f"--aux_data is the ID set itself ({cfg.aux_data}): auxiliary outliers must be other images")
    for flag, directory in (("aux_data", cfg.aux_data if mcfg.uses_aux else None), ("syn_data", cfg.syn_data)):
        if directory:
            other = inputs[flag] = (directory, read_manifest_of(f"--{flag}=", directory))
            other[1].split("train", f"--{flag}={directory}")  # both are read from their train split
            if other[1].shape != manifest.shape:
                raise DataError(f"--{flag}={directory} holds {other[1].shape} images, --id_data={cfg.id_data} holds "
                                f"{manifest.shape}; convert them to the same "
                                f"{_conversion_hint(other[1].shape, manifest.shape)}")
    if "aux_data" in inputs:
        mcfg = check_aux_size(mcfg, cfg.batch_size, inputs["aux_data"][1].count("train"), manifest.count("train"),
                              cfg.aux_data)
    syn = inputs.get("syn_data", (None, None))[1]
    if syn is not None and syn.class_names != manifest.class_names and data.unnamed_classes(syn) and cfg.verbose:
        print(f"note: --syn_data={cfg.syn_data} has unnamed classes ('0'..'{syn.num_classes - 1}'): its label i is "
              f"taken as class i of --id_data ({manifest.class_names[0]!r}, {manifest.class_names[1]!r}, ...)",
              file=sys.stderr)
    if "aux_data" in inputs and inputs["aux_data"][1].kind == "ood":
        print(f"note: --aux_data={cfg.aux_data} was converted as a held-out OOD test set (kind 'ood'); it is used "
              f"as auxiliary training data here, so do not also report it as held-out OOD data", file=sys.stderr)
    for name, directory in cfg.ood_data.items():
        ood_manifest = read_manifest_of(f"--ood_data={name}=", directory)
        ood_shape = ood_manifest.shape
        if "aux_data" in inputs and fingerprint(ood_manifest) == fingerprint(inputs["aux_data"][1]):
            print(f"warning: --ood_data={name}={directory} is the auxiliary training set (--aux_data): its "
                  f"numbers will not be those of held-out OOD data", file=sys.stderr)
        if ood_shape != manifest.shape:
            raise DataError(f"--ood_data={name}={directory} holds {ood_shape} images, --id_data={cfg.id_data} holds "
                            f"{manifest.shape}; convert it to the same {_conversion_hint(ood_shape, manifest.shape)} "
                            f"or evaluate it later with kood.evaluate --resize")
        if ood_split(ood_manifest) != "test":
            print(f"note: --ood_data={name}={directory} has no test split; the final evaluation scores its "
                  f"{ood_split(ood_manifest)!r} split", file=sys.stderr)
    if cfg.ood_data and _eval_split(cfg, manifest) is None:
        raise DataError(f"--ood_data is compared with a held-out ID split (test, else val), but --id_data="
                        f"{cfg.id_data} has only the splits {sorted(manifest.splits)}; add a test split (README, "
                        f"Workflow 1) or drop --ood_data")
    resumable = checkpoint.latest(os.path.join(cfg.model_dir, "ckpt")) is not None
    if cfg.init_checkpoint and not resumable and not os.path.isfile(classifier_file(cfg.init_checkpoint)):
        found = "is a directory without best.keras" if os.path.isdir(cfg.init_checkpoint) else "does not exist"
        raise DataError(f"--init_checkpoint={cfg.init_checkpoint} {found} (expected a .keras file or a run's "
                        "--model_dir, e.g. a CE run's best.keras)")

    strategy = distribute.make_strategy(cfg.strategy, cfg.tpu)
    role = distribute.worker_role(strategy)
    distribute.check_batch(cfg.batch_size, strategy.num_replicas_in_sync)
    if role.num_workers > 1:
        for flag, (directory, m) in inputs.items():
            distribute.check_shards(directory, m, "train", role.num_workers, flag)
    if cfg.strategy != "auto" or strategy.num_replicas_in_sync > 1:
        print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s) of global batch "
              f"{cfg.batch_size}; worker {role.task_id} of {role.num_workers}"
              f"{' (chief)' if role.is_chief else ' (writes to a temporary directory)'}", file=sys.stderr)
    # A second training in the run's directory would overwrite this one's checkpoints and logs.
    locked = locked_output(cfg.model_dir, "--model_dir", activity="training the run in this --model_dir",
                           advice="wait for it or stop it (rerunning the same command then resumes the run), or "
                                  "use another --model_dir. Two trainings in one run directory would overwrite "
                                  "each other's checkpoints")
    with locked if role.is_chief else contextlib.nullcontext():
        _check_model_dir(cfg, {flag: fingerprint(m) for flag, (_, m) in inputs.items()}, write=role.is_chief)
        out_dir = cfg.model_dir if role.is_chief else tempfile.mkdtemp(prefix=f"kood-worker{role.task_id}-")
        try:
            results = _train_and_evaluate(cfg, mcfg, manifest, strategy, out_dir, role.num_workers)
            results["chief"] = role.is_chief  # only the chief's results are the run's (docs/distributed.md)
        finally:
            if not role.is_chief:
                shutil.rmtree(out_dir, ignore_errors=True)
    return results


def _train_and_evaluate(cfg: RunConfig, mcfg: MethodConfig, manifest, strategy: tf.distribute.Strategy,
                        out_dir: str, num_workers: int) -> dict:
    """The epoch loop; reads checkpoints from `cfg.model_dir`, writes everything into `out_dir`."""
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(cfg.seed)
    steps = cfg.steps_per_epoch or max(1, manifest.count("train") // int(cfg.batch_size * cfg.sio_ratio))
    latest = checkpoint.latest(os.path.join(cfg.model_dir, "ckpt"))
    with strategy.scope():
        classifier = _build_classifier(cfg, manifest, resuming=latest is not None)
        if cfg.sync_batchnorm:
            distribute.synchronize_batchnorm(classifier)
        trainer = OODTrainer(classifier, mcfg, seed=cfg.seed)
        if mcfg.uses_aux:
            distribute.check_batch(trainer.aux_batch_size(cfg.batch_size), strategy.num_replicas_in_sync,
                                   "batch_size x aux_batch_factor (auxiliary batch)")
        optimizer = make_optimizer(cfg, steps)
        trainer.compile(optimizer=optimizer, jit_compile=cfg.jit_compile)
        state = {"epoch": 0, "best": None, "finished": False, "history": []}
        if latest:
            state = checkpoint.restore(latest, classifier, optimizer)
            print(f"Resuming {cfg.model_dir} from {latest} (epoch {state['epoch']}/{cfg.epochs})", file=sys.stderr)
            if not os.path.isfile(os.path.join(out_dir, "results.json")):  # not a finished run's rerun
                _keras_files(classifier, out_dir, state)  # a killed process may have stopped before writing them

    ckpt_dir = os.path.join(out_dir, "ckpt")
    val_split, selects = _val_split(cfg, manifest), _selects_best(cfg, manifest)
    if state["epoch"] < cfg.epochs:
        probe_id = next(iter(data.eval_dataset(cfg.id_data, val_split or "train", batch_size=cfg.batch_size)))[0]
        probe_aux = aux_manifest = None
        if mcfg.uses_aux:
            aux_manifest = read_manifest(cfg.aux_data)
            probe_aux = next(iter(data.eval_dataset(cfg.aux_data, next(iter(aux_manifest.splits)),
                                                    batch_size=trainer.aux_batch_size(cfg.batch_size))))[0]
        if cfg.verbose:
            print(_describe(cfg, mcfg, manifest, steps, trainer.aux_batch_size(cfg.batch_size), state["epoch"],
                            aux_manifest.count("train") if aux_manifest else None),
                  _selection_note(cfg, manifest), sep="\n", file=sys.stderr, flush=True)
        hparams = {"method": cfg.method, "arch": cfg.arch, "optimizer": cfg.optimizer, "lr": cfg.lr,
                   "batch_size": cfg.batch_size, "epochs": cfg.epochs, "sio_ratio": cfg.sio_ratio, "seed": cfg.seed,
                   "precision": cfg.precision, "replicas": strategy.num_replicas_in_sync, **dataclasses.asdict(mcfg)}
        # Points past the checkpoint are a killed process's: the rerun redoes them. Without a checkpoint the
        # settings may have changed too, so the hparams go as well.
        resume = (int(optimizer.iterations.numpy()), state["epoch"]) if latest else (-1, -1)
        logger = TensorBoardLogger(os.path.join(out_dir, "logs"), probe_id, probe_aux, hparams, cfg.log_every,
                                   resume=resume)
        guard = NanGuard()
        verbose = cfg.verbose if sys.stderr.isatty() or cfg.verbose == 0 else 2
        for epoch in range(state["epoch"], cfg.epochs):
            start = time.time()
            trainer.fit(_epoch_data(cfg, trainer, epoch, manifest.shape, strategy, num_workers), epochs=epoch + 1,
                        initial_epoch=epoch, steps_per_epoch=steps, callbacks=[guard, logger, RunProgbar(cfg.epochs)],
                        shuffle=False,  # the pipeline shuffles (seeded per epoch); Keras can't shuffle a Dataset
                        verbose=verbose)
            distribute.average_batchnorm_statistics(classifier, strategy)  # before validation and checkpoints
            record = {"epoch": epoch + 1, "seconds": round(time.time() - start, 2)}
            if val_split and not guard.failure:
                record.update(_validate(classifier, cfg.id_data, val_split))
                logger.log_validation(epoch + 1, val_split, {"accuracy": record["val_accuracy"],
                                                             "ce": record["val_ce"]})
            failure = guard.failure or _diverged(classifier, record)
            if failure:
                advice = (f"The last good checkpoint (epoch {state['epoch']}) is kept in {ckpt_dir}; its settings "
                          f"are locked, so lower --lr or the loss weights in a new --model_dir (--init_checkpoint="
                          f"{os.path.join(cfg.model_dir, 'best.keras')} starts from it)" if state["epoch"] else
                          "No checkpoint was written yet; lower --lr or the loss weights and rerun (the same "
                          "--model_dir is fine)")
                raise FloatingPointError(f"Training stopped in epoch {epoch + 1}: {failure}. {advice}.")
            improved = not selects or state["best"] is None or record["val_accuracy"] > state["best"]
            if improved:
                state["best"] = record["val_accuracy"] if selects else None
                state["best_epoch"] = epoch + 1
            state["epoch"] = epoch + 1
            state["history"].append(record)
            state["finished"] = state["epoch"] >= cfg.epochs
            # The checkpoint first: a process killed before it redoes the epoch and leaves no .keras file
            # of the discarded attempt; one killed after it gets them rewritten by the rerun (_keras_files).
            checkpoint.save(ckpt_dir, classifier, optimizer, state)
            _keras_files(classifier, out_dir, state)
            if verbose and val_split:
                print(f"epoch {epoch + 1}/{cfg.epochs}: {val_split} accuracy {100 * record['val_accuracy']:.2f}%, "
                      f"ce {record['val_ce']:.4f}{' (best so far: best.keras)' if improved and selects else ''}",
                      flush=True)

    # The run's model is best.keras (what kood.evaluate / kood.export load): report on its weights.
    best_epoch = state.get("best_epoch") or _best_epoch(state["history"])
    if best_epoch != state["epoch"]:
        classifier.load_weights(os.path.join(out_dir, "best.keras"))
    results = final_evaluation(classifier, cfg, mcfg, manifest)
    results.update(checkpoint="best.keras", checkpoint_epoch=best_epoch, epochs=state["epoch"])
    results["model_dir"] = cfg.model_dir
    results["replicas"] = strategy.num_replicas_in_sync
    results["tensorboard"] = f"tensorboard --logdir {os.path.join(cfg.model_dir, 'logs')}"
    write_text_atomic(os.path.join(out_dir, "results.json"), json_text(results))
    return results
