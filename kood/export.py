r"""Export a trained classifier as a servable OOD detector: `python -m kood.export`.

Writes a TensorFlow SavedModel whose serving signature takes **uint8** images `[None, H, W, C]` (the
model's input size; other shapes raise InvalidArgumentError, an empty batch gives empty outputs) and
returns
- `logits` `[B, K]` (float32), `probabilities` `[B, K]` (softmax of the logits),
- `score` `[B]`: the detector's OOD score, higher = more OOD (as in `kood.detectors`),
- `is_ood` `[B]` (bool): `score > threshold`.

The threshold is calibrated on a **held-out** ID split (not the training split) so that a fraction
`tpr` of ID images is accepted. Rule: with the n calibration scores sorted ascending, s_1 <= ... <= s_n,
and k the smallest count with k / n >= tpr (k = ceil(tpr * n)), the threshold is s_k plus a float-noise
margin: `NOISE_MARGIN * max(1, |s_k|)`, but at most half the gap to the next larger score (no margin
when there is none). So exactly k calibration images are accepted (more only when several images tie
with s_k), as with `kood.metrics.threshold_at_tpr` (the FPR95 rule of kood.evaluate, accept when
score <= s_k), and the float noise between calibration and serving (batch size, kernels) cannot flip
a calibration decision.

Only scores computed from the logits alone can run inside the exported graph: `EXPORTABLE`
(energy, msp, max_logit, gen). Detectors that need fit data (knn, react, vim, ...), input
gradients (odin) or the features (ash, gradnorm) are refused with a ConfigError.

Output directory (`--out`), written under a hidden temporary name and renamed when complete:
```
OUT/
  saved_model.pb, variables/, fingerprint.pb, assets/   # the SavedModel (tf.saved_model.load(OUT))
  classifier.keras                                       # the classifier (kood.models.load_classifier)
  detector.json                                          # score, hyperparameters, threshold, calibration
```

Example:
    python -m kood.export --model_dir=runs/demo --out=runs/demo/export
    python -m kood.export --model_dir=runs/demo/last.keras --id_data=data/digits --calib_split=val \
        --detector=msp --tpr=0.9 --out=export_msp --overwrite
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from typing import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from kood.data import eval_dataset
from kood.detectors import DETECTORS, make_detector
from kood.errors import ConfigError, DataError, run_app, run_cli
from kood.manifest import ID_KINDS, read_manifest, same_dataset
from kood.metrics import threshold_at_tpr
from kood.progress import Progress
from kood.rundir import CHECKPOINTS, resolve_model, run_finished, run_id_data, run_temperature
from kood.writer import LOCK_FILE, WriteLock, abandoned, remove_abandoned

FORMAT = "kood-export/1"
DETECTOR_JSON = "detector.json"
KERAS_FILE = "classifier.keras"
SIGNATURE = "serving_default"
OUTPUTS = ("logits", "probabilities", "score", "is_ood")
HELD_OUT_SPLITS = ("val", "validation", "test")  # --calib_split=auto takes the first one present
# relative margin above the k-th calibration score: ~100 float32 ulps, far above the noise between
# batch sizes / kernels (~1e-6 relative), far below score differences that matter
NOISE_MARGIN = 1e-5


# ----------------------------------------------------------------------------------------------
# In-graph scores (float32 twins of the numpy detectors in kood.detectors)


def _energy(logits: tf.Tensor, temperature: float = 1.0) -> tf.Tensor:
    return -temperature * tf.reduce_logsumexp(logits / temperature, axis=1)


def _msp(logits: tf.Tensor) -> tf.Tensor:
    return -tf.reduce_max(tf.nn.softmax(logits, axis=1), axis=1)


def _max_logit(logits: tf.Tensor) -> tf.Tensor:
    return -tf.reduce_max(logits, axis=1)


def _gen(logits: tf.Tensor, gamma: float = 0.1, top_m: int = 100) -> tf.Tensor:
    p = tf.nn.softmax(logits, axis=1)
    top = tf.math.top_k(p, k=min(int(top_m), int(logits.shape[-1]))).values
    return tf.reduce_sum(top ** gamma * (1.0 - top) ** gamma, axis=1)


# name -> fn(logits, **hyperparams); hyperparameters are those of the kood.detectors class
EXPORTABLE: dict[str, Callable[..., tf.Tensor]] = {
    "energy": _energy,
    "msp": _msp,
    "max_logit": _max_logit,
    "gen": _gen,
}


def graph_score(name: str, logits: tf.Tensor, hyperparams: Mapping | None = None) -> tf.Tensor:
    """The OOD score `name` of float32 logits `[B, K]` in TF ops (higher = more OOD).

    Args:
        name: a key of `EXPORTABLE`.
        logits: float32 `[B, K]`.
        hyperparams: the detector's hyperparameters (e.g. `{"temperature": 2.0}` for energy).

    Example:
        graph_score("energy", tf.constant([[0.0, 0.0]]), {"temperature": 1.0})   # [-log 2]
    """
    if name not in EXPORTABLE:
        raise ConfigError(_not_exportable(name))
    return EXPORTABLE[name](logits, **dict(hyperparams or {}))


def _not_exportable(name: str) -> str:
    if name not in DETECTORS:
        return f"Unknown detector. Exportable: {sorted(EXPORTABLE)}. Received: detector={name!r}"
    det = DETECTORS[name]
    why = ("it needs ID fit data (statistics of the training set)" if det.needs_fit
           else "it needs input gradients" if not det.uses_outputs else "it has no in-graph implementation")
    return (f"Detector {name!r} cannot be exported into the serving graph: {why}. Exportable (functions of "
            f"the logits only): {sorted(EXPORTABLE)}. Compare all detectors with kood.evaluate. "
            f"Received: detector={name!r}")


def calibrate_threshold(id_scores, tpr: float = 0.95) -> float:
    """The float32 threshold accepting (score <= threshold) k = ceil(tpr * n) of `id_scores`.

    The k-th smallest score (`kood.metrics.threshold_at_tpr`) plus a float-noise margin that stays
    below the next larger score (module docstring).

    Example:
        calibrate_threshold(np.arange(20.0), 0.95)   # 18.00018: accepts 0..18, i.e. 19 of 20
    """
    scores = np.asarray(id_scores, np.float32).reshape(-1)
    kth = np.float32(threshold_at_tpr(scores, tpr))  # ConfigError on empty / non-finite / bad tpr
    above = scores[scores > kth]
    if above.size == 0:
        return float(kth)
    margin = min(NOISE_MARGIN * max(1.0, abs(float(kth))), (float(above.min()) - float(kth)) / 2.0)
    threshold = np.float32(float(kth) + margin)
    return float(threshold if kth <= threshold < above.min() else kth)  # adjacent float32 values: no room


# ----------------------------------------------------------------------------------------------
# The servable module


class ServableDetector(tf.Module):
    """uint8 images -> {logits, probabilities, score, is_ood}; the threshold is a variable.

    Args:
        model: a kood classifier (float32 pixels -> logits).
        detector: a key of `EXPORTABLE`.
        hyperparams: the detector's hyperparameters.
        threshold: images with `score > threshold` are OOD.
        tpr: the ID acceptance rate the threshold was calibrated for (stored for reference).

    Example:
        module = ServableDetector(model, "energy", {"temperature": 1.0}, threshold=-5.2, tpr=0.95)
        out = module.serve(tf.zeros([2, 8, 8, 1], tf.uint8))
    """

    def __init__(self, model: keras.Model, detector: str, hyperparams: Mapping, threshold: float = 0.0,
                 tpr: float = 0.95):
        super().__init__(name="kood_detector")
        self.model = model
        self.threshold = tf.Variable(threshold, dtype=tf.float32, trainable=False, name="threshold")
        self.tpr = tf.Variable(tpr, dtype=tf.float32, trainable=False, name="tpr")
        self.detector = tf.Variable(detector, dtype=tf.string, trainable=False, name="detector")
        self._score_name, self._hyperparams = detector, dict(hyperparams)  # tf.Module owns `_name`
        self._num_classes = int(model.output_shape[-1])
        self._shape = [None, *(int(d) for d in model.input_shape[1:])]
        # defined here so the input signature carries the model's shape
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec(self._shape, tf.uint8, name="images")])

    def outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """logits, probabilities and score of uint8 images (no threshold)."""
        logits = self.model(tf.cast(images, tf.float32), training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=1),
                "score": graph_score(self._score_name, logits, self._hyperparams)}

    def _empty_outputs(self) -> dict[str, tf.Tensor]:
        logits = tf.zeros([0, self._num_classes], tf.float32)
        return {"logits": logits, "probabilities": logits, "score": tf.zeros([0], tf.float32)}

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        # a loaded signature does not enforce its input shape: a wrong size would be scored (or fail deep
        # in the model); EnsureShape raises InvalidArgumentError naming the expected and the received shape
        images = tf.ensure_shape(images, self._shape, name="images_must_have_the_model_input_size")
        # an empty batch skips the model: some CPU kernels (oneDNN convolutions) fail on 0 images
        out = tf.cond(tf.shape(images)[0] > 0, lambda: self.outputs(images), self._empty_outputs)
        out["is_ood"] = out["score"] > self.threshold
        return out


# ----------------------------------------------------------------------------------------------
# Library


def _check_out(out: str, overwrite: bool) -> None:
    if not out:
        raise ConfigError("--out is required (the export directory to create)")
    if os.path.exists(out) and os.path.samefile(out, os.getcwd()):  # it would be renamed away under us
        raise ConfigError(f"--out={out} is the current directory, which cannot be replaced; choose another --out")
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return  # an empty dir holds nothing to lose: it is replaced
    # never delete a directory that is not an earlier export (e.g. --out=. or a data dir)
    if not os.path.isfile(os.path.join(out, DETECTOR_JSON)):
        raise ConfigError(f"--out={out} exists and is not a kood export (no {DETECTOR_JSON}); it is never replaced, "
                          "not even with --overwrite: choose another --out")
    if not overwrite:
        raise ConfigError(f"--out={out} already exists; pass --overwrite to replace it or choose another --out")


def _publish(tmp: str, out: str, overwrite: bool) -> None:
    """Renames the finished `tmp` dir to `out` (replacing an earlier export if `overwrite`)."""
    _check_out(out, overwrite)  # again: --out may have appeared while we worked
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=_replaced_prefix(out), dir=os.path.dirname(tmp))
    lock = WriteLock(old)  # in use: a kill before the rmtree leaves it to the next export (_recover_replaced)
    try:
        os.replace(out, os.path.join(old, "export"))
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(os.path.join(old, "export"), out)
            raise
        shutil.rmtree(old)
    finally:
        lock.release()


def _replaced_prefix(out: str) -> str:
    return f".{os.path.basename(os.path.abspath(out))}.old-"


def _recover_replaced(out: str) -> None:
    """An export killed inside `_publish` leaves the export it was replacing in a hidden `.OUT.old-*` dir: it
    goes back to `out` if the new one never got there, else it is removed."""
    for path in abandoned(os.path.dirname(os.path.abspath(out)), _replaced_prefix(out)):
        if not re.fullmatch(r"[a-z0-9_]{8}", os.path.basename(path)[len(_replaced_prefix(out)):]):
            continue  # mkdtemp's name for this --out, not e.g. `.OUT.old-x.old-*` of an export to --out=OUT.old-x
        previous = os.path.join(path, "export")
        if not os.path.exists(out) and os.path.isfile(os.path.join(previous, DETECTOR_JSON)):
            print(f"note: restoring {out} from {path}: an export replacing it was interrupted", file=sys.stderr)
            os.replace(previous, out)
        else:
            print(f"note: removing {path}, an export replaced by an interrupted run", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)


def _calibration_split(manifest, id_data: str, calib_split: str) -> str:
    if calib_split != "auto":
        manifest.split(calib_split, f"--id_data={id_data} (--calib_split)")  # DataError naming the splits
        return calib_split
    for name in HELD_OUT_SPLITS:
        if name in manifest.splits:
            return name
    raise DataError(f"--id_data={id_data} has no held-out split {list(HELD_OUT_SPLITS)} to calibrate the threshold "
                    f"on (it has {sorted(manifest.splits)}); pass --calib_split=NAME of held-out ID images")


def export_detector(model_path: str, out: str, *, id_data: str | None = None, calib_split: str = "auto",
                    detector: str = "energy", detector_params: Mapping | None = None, tpr: float = 0.95,
                    checkpoint: str = "best", batch_size: int = 256, overwrite: bool = False) -> dict:
    """Exports the classifier at `model_path` with a calibrated OOD threshold to `out`.

    Args:
        model_path: a kood run dir (uses `<checkpoint>.keras` and `config.json`) or a `.keras` file.
        out: export directory to create (SavedModel + `classifier.keras` + `detector.json`).
        id_data: ID dataset dir holding the calibration split; default: the run's `config.json` `id_data`.
        calib_split: held-out ID split to calibrate on; `"auto"` = the first of val, validation, test.
            Use held-out images: on training images the model is over-confident and fewer than `tpr` of
            new ID images would be accepted.
        detector: a key of `EXPORTABLE` (energy, msp, max_logit, gen).
        detector_params: its hyperparameters; energy's `temperature` defaults to the run's T (else 1).
        tpr: fraction of calibration ID images accepted, in (0, 1).
        checkpoint: `"best"` or `"last"` (run dirs only).
        batch_size: images per forward pass during calibration.
        overwrite: replace an earlier export at `out`.

    Returns:
        The contents of `detector.json`.

    Example:
        info = export_detector("runs/demo", "runs/demo/export", tpr=0.95)
        info["threshold"]
    """
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr < 1.0:
        raise ConfigError(f"--tpr must be in (0, 1) (the fraction of ID images accepted). Received: tpr={tpr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch_size must be an integer >= 1. Received: batch_size={batch_size!r}")
    if detector not in EXPORTABLE:
        raise ConfigError(_not_exportable(detector))
    if detector_params is not None and not isinstance(detector_params, Mapping):
        raise ConfigError(f"--detector_params must be a JSON object. Received: {detector_params!r}")
    if os.path.isdir(os.path.dirname(os.path.abspath(out))):
        _recover_replaced(out)
    _check_out(out, overwrite)

    from kood.models import load_classifier

    model_file, config = resolve_model(model_path, checkpoint)
    params = dict(detector_params or {})
    temperature_from = "--detector_params" if "temperature" in params else None
    if detector == "energy" and "temperature" not in params:
        run_t = run_temperature(config)
        params["temperature"] = run_t if run_t is not None else 1.0
        temperature_from = "run config.json" if run_t is not None else "default (no run config.json)"
    trained_on = (config or {}).get("id_data")
    if id_data is not None and trained_on and same_dataset(id_data, trained_on) is False:
        print(f"warning: --id_data={id_data} is not the ID data of the run ({trained_on}, its "
              f"config.json); the threshold is calibrated on {id_data}", file=sys.stderr)
    if id_data is None:
        id_data = run_id_data(model_path, config)
    model = load_classifier(model_file)
    # the kood detector validates the hyperparameters (names, ranges) and reports them
    hyperparams = make_detector(detector, model, **params).hyperparams()

    manifest = read_manifest(id_data)
    if manifest.kind not in ID_KINDS:  # an OOD / outlier set would calibrate a meaningless threshold
        raise DataError(f"--id_data={id_data} is a {manifest.kind!r} set (kind in its manifest.json); the threshold "
                        f"is calibrated on held-out ID images, i.e. a set of kind {' or '.join(map(repr, ID_KINDS))}")
    model_shape = tuple(int(d) for d in model.input_shape[1:])
    if manifest.shape != model_shape:
        raise DataError(f"--id_data={id_data} holds {list(manifest.shape)} images but the model {model_file} takes "
                        f"{list(model_shape)}; calibrate on the ID data the model was trained on")
    num_classes = int(model.output_shape[-1])
    if manifest.num_classes not in (0, num_classes):
        raise DataError(f"--id_data={id_data} has {manifest.num_classes} classes but the model {model_file} has "
                        f"{num_classes} outputs; calibrate on the ID data the model was trained on")
    split = _calibration_split(manifest, id_data, calib_split)
    held_out = split != "train"  # kood.train always trains on the `train` split
    if not held_out:
        print(f"warning: calibrating on the training split {split!r}; the threshold will accept "
              f"fewer than {tpr:.0%} of new ID images. Use held-out ID data (--calib_split).", file=sys.stderr)

    module = ServableDetector(model, detector, hyperparams, tpr=float(tpr))
    outputs = tf.function(module.outputs, reduce_retracing=True)  # the serving graph minus the threshold
    scores, correct = [], []
    with Progress(f"calibrate on {split}", total=manifest.count(split)) as bar:
        for images, labels in eval_dataset(id_data, split, batch_size=batch_size):
            out_b = outputs(tf.cast(images, tf.uint8))  # the reader's floats are whole 0..255 values
            scores.append(out_b["score"].numpy())
            correct.append(np.argmax(out_b["logits"].numpy(), axis=1) == labels.numpy())
            bar.update(int(images.shape[0]))
    scores = np.concatenate(scores)
    threshold = calibrate_threshold(scores, tpr)
    module.threshold.assign(threshold)
    labelled = manifest.num_classes > 0

    info = {
        "format": FORMAT,
        "detector": detector,
        "hyperparams": hyperparams,
        "temperature": hyperparams.get("temperature"),
        "temperature_from": temperature_from,
        "threshold": threshold,
        "tpr": float(tpr),
        "decision": "is_ood = score > threshold (score: higher = more OOD)",
        "calibration": {
            "id_data": id_data, "split": split, "count": int(scores.size), "held_out": held_out,
            "accepted": int(np.sum(scores <= np.float32(threshold))),
            "rule": f"k = ceil(tpr * n) calibration images accepted; threshold = k-th smallest score + "
                    f"min({NOISE_MARGIN:g} * max(1, |score|), half the gap to the next score)",
            "id_accuracy": float(np.mean(np.concatenate(correct))) if labelled else None,
        },
        "input": {"shape": [None, *model_shape], "dtype": "uint8", "name": "images"},
        "num_classes": num_classes,
        "class_names": list(manifest.class_names) if labelled else [str(i) for i in range(num_classes)],
        "signature": {"name": SIGNATURE, "outputs": list(OUTPUTS)},
        "files": {"saved_model": ".", "keras": KERAS_FILE},
        "model": {"file": os.path.abspath(model_file), "checkpoint": checkpoint if os.path.isdir(model_path) else None,
                  "method": (config or {}).get("method"), "arch": (config or {}).get("arch"),
                  "run_finished": run_finished(model_file)},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # a hidden, visibly partial name in the same directory (rename is atomic there); mkdir honours the umask
    prefix = f".{os.path.basename(os.path.abspath(out))}.partial-"
    tmp = os.path.join(parent, f"{prefix}{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    lock = WriteLock(tmp)  # marks it as in use: an export killed by SIGKILL leaves its temp dir, the next removes it
    try:
        remove_abandoned(parent, prefix, keep=tmp, what="a partial export")
        tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve})
        model.save(os.path.join(tmp, KERAS_FILE))
        with open(os.path.join(tmp, DETECTOR_JSON), "w") as f:  # last: marks a complete export
            json.dump(info, f, indent=2)
            f.write("\n")
        # still locked while it is renamed: a concurrent export's remove_abandoned would delete it (or, mid-rename,
        # files of the published export); the lock file moves along and is removed, it is not part of the export
        _publish(tmp, out, overwrite)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, LOCK_FILE))
    finally:  # on any failure nothing complete-looking is left: the temp dir goes
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        lock.release()
    return info


# ----------------------------------------------------------------------------------------------
# CLI


def define_flags() -> None:
    """Defines the CLI flags (only when run as a program, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("model_dir", None, "Trained classifier: a kood run dir (uses --checkpoint.keras and "
                        "config.json) or a .keras file.")
    flags.DEFINE_string("out", None, "Export directory to create (SavedModel + classifier.keras + detector.json).")
    flags.DEFINE_enum("checkpoint", "best", list(CHECKPOINTS), "Which model of a run dir to export.")
    flags.DEFINE_string("id_data", None, "ID dataset dir holding the calibration split (default: the run's "
                        "config.json id_data).")
    flags.DEFINE_string("calib_split", "auto", "HELD-OUT ID split the threshold is calibrated on (not the "
                        f"training split: that warns); auto = the first of {','.join(HELD_OUT_SPLITS)}.")
    flags.DEFINE_string("detector", "energy", f"OOD score computed in the graph. Exportable: {','.join(EXPORTABLE)}.")
    flags.DEFINE_string("detector_params", None, "JSON of the detector's hyperparameters, e.g. "
                        "'{\"temperature\": 2.0}' (energy's T defaults to the run's temperature).")
    flags.DEFINE_float("tpr", 0.95, "Fraction of held-out ID images accepted (is_ood=False) by the threshold.")
    flags.DEFINE_integer("batch_size", 256, "Images per forward pass during calibration.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing export at --out.")


def run_from_flags(flags_values) -> dict:
    """Runs the export described by parsed absl flags; returns detector.json's contents."""
    for name in ("model_dir", "out"):
        if not getattr(flags_values, name):
            raise ConfigError(f"--{name} is required")
    params = None
    if flags_values.detector_params:
        try:
            params = json.loads(flags_values.detector_params)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--detector_params is not valid JSON ({e}). Received: {flags_values.detector_params!r}")
    info = export_detector(flags_values.model_dir, flags_values.out, id_data=flags_values.id_data,
                           calib_split=flags_values.calib_split, detector=flags_values.detector,
                           detector_params=params, tpr=flags_values.tpr, checkpoint=flags_values.checkpoint,
                           batch_size=flags_values.batch_size, overwrite=flags_values.overwrite)
    c = info["calibration"]
    print(f"Exported {info['detector']} detector to {flags_values.out}\n"
          f"  threshold {info['threshold']:.6g} (is_ood = score > threshold): accepts {c['accepted']}/{c['count']} "
          f"of {c['id_data']} split {c['split']!r} (tpr {info['tpr']})\n"
          f"  serve: saved_model_cli show --dir {flags_values.out} --tag_set serve --signature_def {SIGNATURE}")
    return info


def main(argv) -> None:
    from absl import flags

    values = flags.FLAGS
    run_cli("kood.export", argv, lambda: run_from_flags(values), data_dirs=lambda: [
        values.id_data or (resolve_model(values.model_dir, values.checkpoint)[1] or {}).get("id_data")])


if __name__ == "__main__":
    define_flags()
    run_app(main)
