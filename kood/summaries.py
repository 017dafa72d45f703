"""TensorBoard logging, the NaN guard and the progress bar of `kood.train` (Keras callbacks).

Writes to `MODEL_DIR/logs/`:
- `train/`: per-step scalars, each step's own value (every loss term, accuracy, energies, mask
  fractions, lr);
- `epoch/`: per-epoch scalars (the same as epoch means, lr at the epoch's last step, the
  held-out ID split's `SPLIT/accuracy` and `SPLIT/ce`, and the mean input-gradient norm of
  the score, paper Fig. 3), histograms of ID vs auxiliary energy (paper Fig. 4), an image
  grid of the outliers the GReg+ sampler chose, and the run's hyperparameters (hparams plugin).
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np
import tensorflow as tf

from kood import losses


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """Tiles `[N, H, W, C]` pixel images (0..255) into one `[1, rows*H, columns*W, C]` float image in [0, 1]."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image / 255.0
    return grid[None]


HPARAMS_TAG = "_hparams_/session_start_info"


def drop_events_after(log_dir: str, max_step: int) -> set[str]:
    """Removes the events past `max_step` from the TensorBoard event files in `log_dir`; returns the tags kept.

    A run resumed from a checkpoint redoes the steps after it; without this, TensorBoard would show
    the killed process's points and the rerun's for the same steps. Files are rewritten atomically.

    Example:
        drop_events_after("runs/x/logs/train", max_step=1200)
    """
    kept_tags: set[str] = set()
    if not os.path.isdir(log_dir):
        return kept_tags
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        path = os.path.join(log_dir, name)
        records, dropped = [], 0
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                if event.step > max_step:
                    dropped += 1
                    continue
                records.append(record.numpy())
                kept_tags.update(value.tag for value in event.summary.value)
        except tf.errors.DataLossError:  # a record half-written when the process was killed: drop it
            dropped += 1
        if dropped:
            tmp = os.path.join(log_dir, f".{name}.tmp")
            with tf.io.TFRecordWriter(tmp) as writer:
                for record in records:
                    writer.write(record)
            os.replace(tmp, path)
    return kept_tags


class TensorBoardLogger(keras.callbacks.Callback):
    """Step and epoch summaries (see module docstring).

    Step scalars are each step's own values (Keras' logs hold means since the epoch began, what the
    progress bar shows); epoch scalars are the epoch means, except `lr`: the epoch's last step's.

    Args:
        log_dir: `MODEL_DIR/logs`.
        probe_id: a fixed batch of ID images for the epoch-end energy histograms.
        probe_aux: a fixed batch of auxiliary images (a candidate pool for GReg+).
        hparams: flat dict of the run's hyperparameters.
        log_every: write step scalars every this many steps.
        resume: `(global step, epoch)` of the checkpoint the run starts from (`(-1, -1)` without one:
            everything, hparams included): events an interrupted process logged after it are removed first.
    """

    def __init__(self, log_dir: str, probe_id: tf.Tensor, probe_aux: tf.Tensor | None, hparams: dict,
                 log_every: int = 10, resume: tuple[int, int] | None = None):
        super().__init__()
        kept = set()
        if resume:
            drop_events_after(os.path.join(log_dir, "train"), resume[0])
            kept = drop_events_after(os.path.join(log_dir, "epoch"), resume[1])
        self.train_writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.epoch_writer = tf.summary.create_file_writer(os.path.join(log_dir, "epoch"))
        self.probe_id, self.probe_aux = probe_id, probe_aux
        self.hparams, self.log_every = hparams, max(1, int(log_every))
        self._hparams_written = HPARAMS_TAG in kept
        self._previous: tuple[int, dict] | None = None

    def _lr(self) -> float:
        """The lr of the step just taken (the optimizer's counter is already past it)."""
        opt = self.model.optimizer
        # Keras 3's `learning_rate` is the NEXT step's value; the schedule itself is `_learning_rate`.
        schedule = opt._learning_rate
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            return float(schedule(opt.iterations - 1))
        return float(opt.learning_rate)

    def _step_values(self, batch: int, logs: dict) -> dict | None:
        """Each step's own values from Keras' running means (all kood's metrics are per-step means)."""
        previous, self._previous = self._previous, (batch, logs)
        if batch == 0:
            return logs
        if previous is None or previous[0] != batch - 1:
            return None
        return {k: (batch + 1) * v - batch * previous[1][k] for k, v in logs.items() if k in previous[1]}

    def on_train_begin(self, logs=None):
        if not self._hparams_written:
            from tensorboard.plugins.hparams import api as hp

            with self.epoch_writer.as_default():
                hp.hparams({k: v for k, v in self.hparams.items() if isinstance(v, (bool, int, float, str))})
            self._hparams_written = True

    def on_epoch_begin(self, epoch, logs=None):
        self._previous = None  # Keras' means restart with each epoch

    def on_train_batch_end(self, batch, logs=None):
        values = self._step_values(batch, {k: float(v) for k, v in (logs or {}).items()})
        step = int(self.model.optimizer.iterations.numpy())
        if values is None or (step % self.log_every and step != 1):
            return
        with self.train_writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)
            tf.summary.scalar("lr", self._lr())

    def log_validation(self, epoch: int, split: str, values: dict) -> None:
        """Epoch-end scores on a held-out ID split (`kood.run` computes them after each epoch's fit)."""
        with self.epoch_writer.as_default(step=epoch):
            for name, value in values.items():
                tf.summary.scalar(f"{split}/{name}", float(value))
        self.epoch_writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        trainer = self.model
        step = int(trainer.optimizer.iterations.numpy())
        cfg = trainer.config
        with self.epoch_writer.as_default(step=epoch + 1):
            for name, value in (logs or {}).items():
                tf.summary.scalar(name, float(value))
            tf.summary.scalar("lr", self._lr())
            tf.summary.scalar("global_step", step)
            s_id = losses.energy_score(trainer.classifier(self.probe_id, training=False), cfg.temperature)
            tf.summary.histogram("energy/id", s_id)
            norms = [trainer.score_grad_norm(self.probe_id)]
            if self.probe_aux is not None:
                s_aux = losses.energy_score(trainer.classifier(self.probe_aux, training=False), cfg.temperature)
                tf.summary.histogram("energy/aux", s_aux)
                norms.append(trainer.score_grad_norm(self.probe_aux))
                if cfg.sampler == "energy_cluster":
                    num_id = int(round(int(self.probe_aux.shape[0]) / cfg.pool_factor))
                    chosen = tf.gather(self.probe_aux, trainer.select_outliers(self.probe_aux, num_id))
                    tf.summary.image("sampler/chosen_outliers", image_grid(chosen.numpy()[:64]), step=epoch + 1)
            # Paper Fig. 3: mean input-gradient norm of the energy score.
            tf.summary.scalar("score_grad_norm", float(tf.reduce_mean(tf.concat(norms, 0))))
        self.epoch_writer.flush()
        self.train_writer.flush()


class RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar with "Epoch i/N" counting the whole run.

    `kood.run` calls `fit` once per epoch (checkpoint and validation in between), so Keras' own
    bar would print "Epoch 7/7" for the seventh of thirty epochs.
    """

    def __init__(self, total_epochs: int):
        super().__init__()
        self.total_epochs = int(total_epochs)

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss term and remembers where."""

    def __init__(self):
        super().__init__()
        self.failure: str | None = None

    def on_train_batch_end(self, batch, logs=None):
        bad = {k: float(v) for k, v in (logs or {}).items() if not np.isfinite(float(v))}
        if bad:
            step = int(self.model.optimizer.iterations.numpy())
            self.failure = f"non-finite training values at step {step}: {bad}"
            self.model.stop_training = True
