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
        raise DataError(f"{ckpt_dir}: cannot write the checkpoint of epoch {state['epoch']} ({e}). The previous "
                        f"checkpoint is intact: free space (or fix the permissions) and rerun the same command "
                        f"to resume") from e
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
        path = os.path.join(ckpt_dir, f.read().strip())
    if not os.path.isdir(path):
        raise DataError(f"{pointer} names {path}, which does not exist: the checkpoint directory is damaged. "
                        + _recovery(ckpt_dir, path))
    return path


def _recovery(ckpt_dir: str, bad: str) -> str:
    """How to resume from the checkpoint before `bad`, if one is there (`save` keeps two), else start over."""
    older = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("epoch-") and d < os.path.basename(bad))
    restart = "or delete the run's ckpt/ (or use a new --model_dir) to start over"
    if not older:
        return f"No earlier checkpoint is left: {restart}"
    return (f"To resume from the one before, write {older[-1]} into {os.path.join(ckpt_dir, LATEST)} (and remove "
            f"{bad}); {restart}")


def restore(path: str, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> dict:
    """Loads weights and optimizer variables strictly; returns the saved state."""
    try:
        model.load_weights(os.path.join(path, "model.weights.h5"))
        optimizer.build(model.trainable_variables)
        with np.load(os.path.join(path, "optimizer.npz")) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # cut short (a full disk, a partial copy), or edited
        raise DataError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); it is damaged. "
                        + _recovery(os.path.dirname(path), path)) from e
    if len(values) != len(optimizer.variables):
        raise DataError(f"{path}/optimizer.npz holds {len(values)} optimizer variables, the optimizer has "
                        f"{len(optimizer.variables)}: the checkpoint was made with another optimizer or model")
    for var, value in zip(optimizer.variables, values):
        if tuple(var.shape) != value.shape:
            raise DataError(f"{path}/optimizer.npz: variable {var.path} has shape {value.shape}, "
                            f"expected {tuple(var.shape)}")
        var.assign(value)
    return read_json(os.path.join(path, "state.json"), "checkpoint state")
