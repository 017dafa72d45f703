"""Resumable training state in `MODEL_DIR/ckpt/`, written atomically.

A checkpoint is a directory `ckpt/epoch-NNNNN/` holding the classifier weights
(`model.weights.h5`), the optimizer variables (`optimizer.npz`) and `state.json`
(epochs done, best value, ...). `ckpt/latest` names the newest complete one and
is replaced atomically after the directory is complete, so a run killed at any
moment resumes from the last complete epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile

import keras
import numpy as np

from kood.errors import DataError
from kood.manifest import read_json, write_text_atomic

LATEST = "latest"


def save(ckpt_dir: str, model: keras.Model, optimizer: keras.optimizers.Optimizer, state: dict,
         keep: int = 2) -> str:
    """Writes a checkpoint for `state["epoch"]`; keeps the newest `keep` ones."""
    os.makedirs(ckpt_dir, exist_ok=True)
    # Checked before writing: h5py failing mid-write on a full disk can crash the process on cleanup.
    needed = 4 * sum(int(np.prod(v.shape)) for v in [*model.weights, *optimizer.variables]) + (1 << 20)
    free = shutil.disk_usage(ckpt_dir).free
    kept = "The previous checkpoint is intact: " if latest(ckpt_dir) else ""
    if free < needed:
        raise DataError(f"{ckpt_dir}: {free / 2**20:.1f} MiB free, the checkpoint of epoch {state['epoch']} needs "
                        f"about {needed / 2**20:.1f} MiB. {kept}free space and rerun the same command to resume")
    for leftover in os.listdir(ckpt_dir):  # a write killed before its rename (SIGKILL: no cleanup ran)
        if leftover.startswith(".epoch-"):
            shutil.rmtree(os.path.join(ckpt_dir, leftover), ignore_errors=True)
    name = f"epoch-{int(state['epoch']):05d}"
    final = os.path.join(ckpt_dir, name)
    # A hidden name in the same directory (rename is atomic there); mkdir honours the umask (mkdtemp: 0700).
    tmp = os.path.join(ckpt_dir, f".{name}.{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        model.save_weights(os.path.join(tmp, "model.weights.h5"))
        np.savez(os.path.join(tmp, "optimizer.npz"), *[v.numpy() for v in optimizer.variables])
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # h5py reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{ckpt_dir}: cannot write the checkpoint of epoch {state['epoch']} ({e}). {kept}free "
                        f"space (or fix the permissions) and rerun the same command to resume") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(os.path.join(ckpt_dir, LATEST), name)
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("epoch-"))
    for old in done[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    return final


def latest(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint, or None if there is none."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    if not name:
        raise DataError(f"{pointer} is empty: the checkpoint directory is damaged. " + _recovery(ckpt_dir))
    path = os.path.join(ckpt_dir, name)
    if not os.path.isdir(path):
        raise DataError(f"{pointer} names {path}, which does not exist: the checkpoint directory is damaged. "
                        + _recovery(ckpt_dir, path))
    return path


def _recovery(ckpt_dir: str, bad: str | None = None) -> str:
    """How to resume from the newest checkpoint other than (and older than) `bad` (`save` keeps two), else
    how to start over."""
    others = sorted(d for d in os.listdir(ckpt_dir)
                    if d.startswith("epoch-") and (bad is None or d < os.path.basename(bad)))
    restart = "delete the run's ckpt/ (or use a new --model_dir) to start over"
    if not others:
        return f"No other checkpoint is left: {restart}"
    removal = f" (and remove {bad})" if bad else ""
    return (f"To resume from {others[-1]}, write that name into {os.path.join(ckpt_dir, LATEST)}{removal}; or "
            f"{restart}")


def restore(path: str, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> dict:
    """Loads weights and optimizer variables strictly; returns the saved state."""
    file = os.path.join(path, "model.weights.h5")
    try:
        model.load_weights(file)
        optimizer.build(model.trainable_variables)
        file = os.path.join(path, "optimizer.npz")
        with np.load(file) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
        file = os.path.join(path, "state.json")
        state = read_json(file, "checkpoint state")
    except (OSError, EOFError, zipfile.BadZipFile, DataError) as e:  # cut short (a full disk, a partial copy)
        raise DataError(f"{file}: cannot read this checkpoint file ({type(e).__name__}: {e}); the checkpoint is "
                        f"damaged. " + _recovery(os.path.dirname(path), path)) from e
    if len(values) != len(optimizer.variables):
        raise DataError(f"{path}/optimizer.npz holds {len(values)} optimizer variables, the optimizer has "
                        f"{len(optimizer.variables)}: the checkpoint was made with another optimizer or model")
    for var, value in zip(optimizer.variables, values):
        if tuple(var.shape) != value.shape:
            raise DataError(f"{path}/optimizer.npz: variable {var.path} has shape {value.shape}, "
                            f"expected {tuple(var.shape)}")
        var.assign(value)
    return state
