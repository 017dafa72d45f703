r"""Evaluate post-hoc OOD detectors on a trained classifier: `python -m kood.evaluate`.

Runs the classifier once per data set (ID test, each OOD set, and the ID fit data when a detector
needs it), scores every detector, and writes to `--output`:
- `results.json` (everything, including the settings), `results.csv` (one row per detector and
  set / group / average), `results.md` (the printed markdown table);
- `tensorboard/`: score histograms of ID vs each OOD set and ROC / PR curve images per detector.
Files are written under temporary names and renamed, so a crashed run leaves no complete-looking
result. `--certify` adds the GReg certified radius (kood.certify).

Example:
    python -m kood.evaluate --model_dir=runs/demo --id_data=data/digits --ood=noise=data/noise \
        --detectors=energy,msp,knn --output=runs/demo/eval
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import sys
from typing import Mapping, Sequence

import keras
import numpy as np

from kood.data import LIMIT_SEED, eval_dataset
from kood.detectors import DETECTORS, make_detector
from kood.detectors.base import collect_outputs
from kood.errors import ConfigError, DataError, check_output_dir, naming, parse_key_values, run_app
from kood.manifest import ID_KINDS, fingerprint, json_text, read_manifest_of, write_text_atomic
from kood.metrics import CONVENTION_NOTE, CONVENTIONS, METRICS, accuracy, metrics_table

RESIZE_CHOICES = ("error", "resize", "center_crop")


# ----------------------------------------------------------------------------------------------
# Flag parsing (pure functions, so they are easy to test)


def parse_ood(spec: str) -> dict[str, str]:
    """`"svhn=DIR,textures=DIR"` -> `{"svhn": "DIR", "textures": "DIR"}`.

    Example:
        parse_ood("svhn=data/svhn,noise=data/noise")
    """
    result: dict[str, str] = {}
    for item in (spec or "").split(","):
        name, sep, path = item.strip().partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--ood must be NAME=DIR[,NAME=DIR...]; bad item {item!r}. Received: --ood={spec!r}")
        if name in result:
            raise ConfigError(f"--ood names the set {name!r} twice. Received: --ood={spec!r}")
        result[name] = path
    return result


def ood_splits(spec: str | Mapping[str, str], ood_names: Sequence[str]) -> dict[str, str]:
    """The split read from each OOD set: `"test"` for all, `"kmnist=train"` for one (others `test`), or
    `"val,kmnist=train"` (a plain item is the others' split). A mapping is taken as per-set splits.

    Example:
        ood_splits("kmnist=train", ["svhn", "kmnist"])   # {'svhn': 'test', 'kmnist': 'train'}
    """
    if isinstance(spec, Mapping):
        per_set, default = dict(spec), "test"
    else:
        items = [item.strip() for item in (spec or "").split(",") if item.strip()]
        plain = [item for item in items if "=" not in item]
        if len(plain) > 1:
            raise ConfigError(f"--ood_split takes one split for all sets and NAME=SPLIT items. Received: {spec!r}")
        default = plain[0] if plain else "test"
        per_set = parse_key_values([item for item in items if "=" in item], "ood_split", typed=False)
    unknown = sorted(set(per_set) - set(ood_names))
    if unknown:
        raise ConfigError(f"--ood_split names {unknown}, which --ood does not (sets: {list(ood_names)})")
    return {name: per_set.get(name, default) for name in ood_names}


def parse_groups(spec: str | None, ood_names: Sequence[str]) -> dict[str, list[str]]:
    """`"near=a,b;far=c"` -> `{"near": ["a", "b"], "far": ["c"]}`; every set must be in `ood_names`.

    Example:
        parse_groups("near=cifar100;far=svhn,textures", ["cifar100", "svhn", "textures"])
    """
    groups: dict[str, list[str]] = {}
    if not spec:
        return groups
    for item in spec.split(";"):
        name, sep, sets = item.strip().partition("=")
        members = [s.strip() for s in sets.split(",") if s.strip()]
        if not sep or not name.strip() or not members:
            raise ConfigError(f"--ood_groups must be GROUP=SET,SET[;GROUP=SET...]; bad item {item!r}. "
                              f"Received: --ood_groups={spec!r}")
        unknown = [s for s in members if s not in ood_names]
        if unknown:
            raise ConfigError(f"--ood_groups group {name.strip()!r} names sets {unknown} that are not in --ood "
                              f"(known: {list(ood_names)}). Received: --ood_groups={spec!r}")
        groups[name.strip()] = members
    return groups


def parse_detectors(spec: str) -> list[str]:
    """`"energy,msp"` -> `["energy", "msp"]`; unknown names list the known ones."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--detectors needs at least one name. Known: {sorted(DETECTORS)}. Received: {spec!r}")
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise ConfigError(f"Unknown detector(s) {unknown}. Known: {sorted(DETECTORS)}. Received: --detectors={spec!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--detectors lists a detector twice. Received: --detectors={spec!r}")
    return names


# ----------------------------------------------------------------------------------------------
# Library


def _read(directory: str, split: str, role: str, split_flag: str, *, model_shape, resize: str, batch_size: int,
          limit) -> tuple:
    """`(batches, images in the split)`."""
    manifest = read_manifest_of(f"{role} ", directory)
    splits = sorted(manifest.splits)
    if split not in splits:  # name the flag that reads another split (a held-out OOD set may have only 'train')
        hint = f"{split_flag}={splits[0]}" if len(splits) == 1 else f"{split_flag}=NAME, NAME one of them"
        raise DataError(f"{role} {directory}: no split {split!r}; it has {splits}. To read another split, pass {hint}")
    try:
        return eval_dataset(directory, split, batch_size=batch_size, image_size=model_shape, resize=resize,
                            limit=limit), manifest.count(split)
    except DataError as e:
        raise DataError(naming(f"{role} ", directory, e)) from e


def evaluate(model: keras.Model, id_dir: str, ood_dirs: Mapping[str, str], detectors: Sequence[str], *,
             fit_dir: str | None = None, fit_split: str = "train", id_split: str = "test",
             ood_split: str | Mapping[str, str] = "test", groups: Mapping[str, Sequence[str]] | None = None,
             resize: str = "error",
             convention: str = "id", batch_size: int = 256, limit: int | None = None, fit_limit: int | None = None,
             detector_params: Mapping[str, dict] | None = None, certify: bool = False,
             certify_options: dict | None = None, keep_scores: bool = False) -> dict:
    """Scores `detectors` on ID vs each OOD set and computes the metrics.

    Args:
        model: a kood classifier.
        id_dir: ID dataset directory (its `id_split` is the ID test set).
        ood_dirs: `{name: dataset dir}` of OOD sets.
        ood_split: the split read from each OOD set: one for all, or per set (see `ood_splits`).
        detectors: names from `kood.detectors.DETECTORS`.
        fit_dir: ID data for detectors that need fitting (default: `id_dir`), split `fit_split`.
        groups: `{group: [OOD set names]}`, e.g. near / far.
        resize: `"error"` (a set whose size or channels differ from the model's input is an error
            naming the set), `"resize"` or `"center_crop"`.
        convention: FPR95 convention, `"id"` (ID positive) or `"ood"`.
        batch_size: images per forward pass.
        limit: at most this many images of the ID test set and of each OOD set: a random subset drawn with a
            fixed seed (`kood.data.LIMIT_SEED`), the same every run.
        fit_limit: at most this many fit images (drawn the same way).
        detector_params: `{detector: {hyperparameter: value}}`.
        certify: also compute the certified radius (`kood.certify.certify`, energy score).
        certify_options: extra keyword arguments of `kood.certify.certify`.
        keep_scores: include the raw score arrays under `"scores"` (for plots; not JSON-serialised).

    Returns:
        `{"convention", "convention_note", "id_accuracy", "detectors": {name: {"hyperparams", "sets",
        "groups", "average"}}, "settings": {...}[, "certify": {...}][, "scores": {...}]}`. The settings'
        `counts` and `split_sizes` are `{"id": n, "fit": n or None, "ood": {name: n}}`: images scored, and
        images in each split read (more than scored when a limit applied).

    Example:
        evaluate(model, "data/cifar10", {"svhn": "data/svhn"}, ["energy", "knn"], groups={"far": ["svhn"]})
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"fpr convention must be one of {CONVENTIONS}. Received: convention={convention!r}")
    if resize not in RESIZE_CHOICES:
        raise ConfigError(f"resize must be one of {RESIZE_CHOICES}. Received: resize={resize!r}")
    if not ood_dirs:
        raise ConfigError("evaluate needs at least one OOD set (--ood). Received: ood_dirs={}")
    detectors = parse_detectors(",".join(detectors))
    params = dict(detector_params or {})
    stray = [n for n in params if n not in detectors]
    if stray:
        raise ConfigError(f"detector_params for detectors not being evaluated: {stray}. Evaluated: {detectors}")
    groups = parse_groups(";".join(f"{g}={','.join(m)}" for g, m in (groups or {}).items()), list(ood_dirs))
    dets = {name: make_detector(name, model, **params.get(name, {})) for name in detectors}
    model_shape = tuple(int(d) for d in model.input_shape[1:])
    read = dict(model_shape=model_shape, resize=resize, batch_size=batch_size)

    # build every reader first, so a bad set fails before any long computation
    needs_fit = [n for n, d in dets.items() if d.needs_fit]
    fit_flag = "--fit_data" if fit_dir else "--id_data"
    fit_dir = fit_dir or id_dir
    if needs_fit:  # before any reading: fitted on outliers, knn's scores mean nothing, mahalanobis fails obscurely
        kind = read_manifest_of(f"{fit_flag}=", fit_dir).kind
        if kind not in ID_KINDS:
            default = " (the default --fit_data)" if fit_flag == "--id_data" else ""
            raise DataError(f"{fit_flag}={fit_dir}{default} is a set of kind {kind!r} (its manifest.json); detectors "
                            f"{needs_fit} are fitted on ID training data, a set of kind "
                            f"{' or '.join(map(repr, ID_KINDS))}: pass the model's ID training set as --fit_data")
    id_ds, id_size = _read(id_dir, id_split, "ID set (--id_data)", "--id_split", limit=limit, **read)
    splits = ood_splits(ood_split, list(ood_dirs))
    ood_read = {name: _read(d, splits[name], f"OOD set {name!r} (--ood)", f"--ood_split={name}", limit=limit, **read)
                for name, d in ood_dirs.items()}
    ood_ds = {name: ds for name, (ds, _) in ood_read.items()}
    fit_ds = fit_size = fit_count = None
    if needs_fit:
        fit_ds, fit_size = _read(fit_dir, fit_split, f"detectors {needs_fit} need ID fit data (--fit_data, default: "
                                 f"the --id_data train split); fit set", "--fit_split", limit=fit_limit, **read)

    if fit_ds is not None:
        fit_out = collect_outputs(model, fit_ds, desc="fit data")
        fit_count = int(len(fit_out["logits"]))
        for name in needs_fit:
            try:
                dets[name].fit_outputs(fit_out)
            except ConfigError as e:
                raise ConfigError(f"{e} (fit set {fit_dir}, split {fit_split!r})") from e
    outputs = {"id": collect_outputs(model, id_ds, desc="id")}
    for name, ds in ood_ds.items():
        outputs[name] = collect_outputs(model, ds, desc=name)

    scores: dict[str, dict[str, np.ndarray]] = {}
    for det_name, det in dets.items():
        if det.uses_outputs:
            scores[det_name] = {k: det.score_outputs(out) for k, out in outputs.items()}
        else:  # needs the images (input gradients)
            sets = {"id": id_ds, **ood_ds}
            scores[det_name] = {k: np.concatenate([det.score(x) for x, _ in ds]) for k, ds in sets.items()}

    id_labels = outputs["id"].get("labels")
    labelled = id_labels is not None and bool(np.all(id_labels >= 0))
    results = {
        "convention": convention, "convention_note": CONVENTION_NOTE[convention],
        "id_accuracy": accuracy(outputs["id"]["logits"], id_labels) if labelled else None,
        "detectors": {},
        "settings": {"id_data": id_dir, "id_split": id_split, "ood": dict(ood_dirs), "ood_split": splits,
                     "fit_data": fit_dir if needs_fit else None, "fit_split": fit_split if needs_fit else None,
                     "groups": groups, "resize": resize, "limit": limit, "fit_limit": fit_limit,
                     "limit_seed": LIMIT_SEED if limit is not None or (needs_fit and fit_limit is not None) else None,
                     "counts": {"id": int(len(outputs["id"]["logits"])), "fit": fit_count,
                                "ood": {k: int(len(outputs[k]["logits"])) for k in ood_dirs}},
                     "split_sizes": {"id": id_size, "fit": fit_size,
                                     "ood": {k: size for k, (_, size) in ood_read.items()}},
                     "model_input_shape": list(model_shape)},
    }
    for det_name, det in dets.items():
        s = scores[det_name]
        table = metrics_table(s["id"], {k: v for k, v in s.items() if k != "id"}, groups, convention)
        results["detectors"][det_name] = {"hyperparams": det.hyperparams(), **table}
    if certify:
        from kood.certify import certify as run_certify  # only imported when asked (builds gradient graphs)
        results["certify"] = run_certify(model, id_ds, ood_ds, **(certify_options or {}))
    if keep_scores:
        results["scores"] = scores
    return results


# ----------------------------------------------------------------------------------------------
# Reports


def _rows(results: dict) -> list[dict]:
    rows = []
    for det, r in results["detectors"].items():
        for kind, entries in (("set", r["sets"]), ("group", r["groups"]), ("average", {"average": r["average"]})):
            for name, m in entries.items():
                rows.append({"detector": det, "kind": kind, "name": name, **{k: m[k] for k in METRICS}})
    return rows


def markdown_table(results: dict) -> str:
    """The results as a markdown table (percentages), headed by the model, the data, the FPR95 convention and
    ID accuracy."""
    acc = results["id_accuracy"]
    settings = results["settings"]
    lines = [f"Model: {settings['model_file']}" + (" (from a run that had not finished)"
                                                   if settings.get("run_finished") is False else "")
             ] if settings.get("model_file") else []
    lines += [f"ID data: {settings['id_data']} (split {settings['id_split']}); OOD: "
              + ", ".join(f"{name}={path}" + (f" (split {settings['ood_split'][name]})"
                                                   if settings["ood_split"][name] != "test" else "")
                          for name, path in settings["ood"].items())]
    if settings.get("fit_data"):  # the detectors that need fitting depend on it
        lines.append(f"Fit data: {settings['fit_data']} (split {settings['fit_split']})")
    lines.append(_counts_line(settings))
    lines += [f"Warning: {w}" for w in settings.get("warnings", [])]
    lines += [f"Convention: {results['convention_note']}.",
              f"ID accuracy: {acc * 100:.2f}%" if acc is not None else "ID accuracy: n/a (unlabelled ID set)", "",
              "| detector | set | FPR95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |", "|---|---|---|---|---|---|"]
    for row in _rows(results):
        name = row["name"] if row["kind"] == "set" else f"**{row['name']}**" + (" (group)" if row["kind"] == "group" else "")
        lines.append(f"| {row['detector']} | {name} | " + " | ".join(f"{row[m] * 100:.2f}" for m in METRICS) + " |")
    if "certify" in results:
        c = results["certify"]
        lines += ["", f"Certified radius (energy score, {c['space']} input space, gamma={c['gamma']:.4f} at "
                  f"{c['tpr']:.0%} ID TPR, {c['estimate']}). Note: {c['note']}.", "",
                  "| set | samples | correct | median radius |", "|---|---|---|---|"]
        for name, m in [("ID (accepted)", c["id"])] + [(f"{k} (rejected)", v) for k, v in c["ood"].items()]:
            lines.append(f"| {name} | {m['count']} | {m['correct']} | {m['median_radius']:.4g} |")
    return "\n".join(lines) + "\n"


def _counts_line(settings: dict) -> str:
    """'Images scored: ID 200 of 397, ...': a limited evaluation's numbers are not the whole sets'."""
    counts, sizes = settings["counts"], settings["split_sizes"]
    entries = [("ID", counts["id"], sizes["id"])] + ([("fit", counts["fit"], sizes["fit"])] if counts["fit"] else [])
    entries += [(name, n, sizes["ood"][name]) for name, n in counts["ood"].items()]
    line = "Images scored: " + ", ".join(f"{name} {n}" + (f" of {size}" if n != size else "")
                                         for name, n, size in entries)
    limits = [f"--{flag}={settings[flag]}" for flag in ("limit", "fit_limit")
              if settings[flag] is not None and (flag == "limit" or counts["fit"])]
    if limits:
        line += (f" ({', '.join(limits)}: a random subset of at most that many images per set, drawn with the "
                 f"fixed seed {settings['limit_seed']}, the same every run)")
    return line


def write_reports(results: dict, output: str) -> None:
    """Writes `results.json`, `results.csv`, `results.md` and TensorBoard summaries under `output`."""
    os.makedirs(output, exist_ok=True)
    # results.json marks a complete evaluation: an earlier run's goes first, so a rerun killed between the
    # writes below leaves no new csv/md next to an old json that looks complete
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output, "results.json"))
    scores = results.get("scores")
    plain = {k: v for k, v in results.items() if k != "scores"}
    if scores is not None:
        log_dir = os.path.join(output, "tensorboard")
        shutil.rmtree(log_dir, ignore_errors=True)  # a rerun's events replace the last run's, as the reports do
        write_tensorboard(scores, log_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["detector", "kind", "name", *METRICS, "convention"])
    writer.writeheader()
    for row in _rows(results):
        writer.writerow({**row, "convention": results["convention"]})
    write_text_atomic(os.path.join(output, "results.csv"), buf.getvalue())
    write_text_atomic(os.path.join(output, "results.md"), markdown_table(results))
    # json last: its presence marks a complete evaluation
    write_text_atomic(os.path.join(output, "results.json"), json_text(plain))


def _curve_image(det: str, s: dict[str, np.ndarray], kind: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    for name, ood in s.items():
        if name == "id":
            continue
        y = np.r_[np.zeros(len(s["id"])), np.ones(len(ood))]  # OOD positive
        score = np.r_[s["id"], ood]
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, score)
            ax.plot(fpr, tpr, label=name)
            ax.set_xlabel("FPR (ID flagged as OOD)")
            ax.set_ylabel("TPR (OOD detected)")
        else:
            precision, recall, _ = precision_recall_curve(y, score)
            ax.plot(recall, precision, label=name)
            ax.set_xlabel("recall (OOD)")
            ax.set_ylabel("precision (OOD)")
    ax.set_title(f"{det} {kind.upper()} (OOD positive)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def write_tensorboard(scores: dict[str, dict[str, np.ndarray]], log_dir: str) -> None:
    """Per detector: histograms of ID and each OOD set's scores, and ROC / PR curve images."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for det, s in scores.items():
            for name, values in s.items():
                tf.summary.histogram(f"{det}/scores/{name}", values, step=0)
            for kind in ("roc", "pr"):
                tf.summary.image(f"{det}/{kind}", _curve_image(det, s, kind)[None], step=0)
    writer.close()


# ----------------------------------------------------------------------------------------------
# CLI

def define_flags() -> None:
    """Defines the CLI flags (only when run as a program, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("model_dir", None, "Required. Trained classifier: a model dir (uses best.keras) or a "
                        ".keras file.")
    flags.DEFINE_string("id_data", None, "ID dataset directory; its --id_split is the ID test set. Default: the "
                        "run's id_data (its config.json).")
    flags.DEFINE_string("ood", None, "Required. OOD sets as NAME=DIR[,NAME=DIR...], e.g. "
                        "svhn=data/svhn,textures=data/dtd. --ood_data is the same flag (kood.train's name for it): "
                        "given both, the last one wins, as for any repeated flag.")
    flags.DEFINE_alias("ood_data", "ood")  # kood.train's name for the same thing
    flags.DEFINE_string("detectors", "energy,msp", f"Comma-separated detectors. Known: {','.join(DETECTORS)}.")
    flags.DEFINE_string("output", None, "Required. Output directory for results.{json,csv,md} and tensorboard/ "
                        "(an earlier evaluation there is replaced).")
    flags.DEFINE_string("fit_data", None, "ID data for detectors that need fitting (knn, react, vim, ...); "
                        "default: --id_data.")
    flags.DEFINE_string("fit_split", "train", "Split of --fit_data.")
    flags.DEFINE_string("id_split", "test", "Split of --id_data used as the ID test set.")
    flags.DEFINE_string("ood_split", "test", "Split read from the OOD sets: one for all (e.g. test), and/or "
                        "NAME=SPLIT for single sets, e.g. 'kmnist=train' (the others read test).")
    flags.DEFINE_string("ood_groups", None, "Groups of OOD sets averaged together: GROUP=SET,SET[;GROUP=SET...], "
                        "e.g. 'near=cifar100;far=svhn,textures'.")
    flags.DEFINE_enum("resize", "error", list(RESIZE_CHOICES), "How to feed sets whose image size or channels "
                      "differ from the model input: error (default), resize (bilinear) or center_crop.")
    flags.DEFINE_bool("center_crop", False, "Shorthand for --resize=center_crop.")
    flags.DEFINE_enum("fpr_convention", "id", list(CONVENTIONS), "FPR95 convention: id = ID positive (GReg, "
                      "Energy, ODIN papers), ood = OOD positive (OpenOOD, pytorch-ood).")
    flags.DEFINE_string("detector_params", None, "JSON of per-detector hyperparameters, e.g. "
                        "'{\"knn\": {\"k\": 10}, \"odin\": {\"eps\": 0.002}}'.")
    flags.DEFINE_bool("certify", False, "Also report the GReg certified radius (energy score; first-order proxy).")
    flags.DEFINE_integer("lipschitz_samples", 0, "With --certify: random points per sample in a ball for the "
                         "sampled local Lipschitz estimate (0 = gradient norm at x only).")
    flags.DEFINE_float("lipschitz_radius", 0.1, "With --certify: radius of that ball (normalized input units).")
    flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")
    flags.DEFINE_integer("limit", None, "Evaluate a seeded random subset of at most this many images of the ID "
                         "test set and of each OOD set, the same every run (not the first N: a set converted from "
                         "class folders is stored sorted by class).")
    flags.DEFINE_integer("fit_limit", None, "Fit detectors on a seeded random subset of at most this many fit "
                         "images, the same every run.")


def aux_set_warnings(config: dict | None, ood: Mapping[str, str]) -> list[str]:
    """One warning per OOD set that holds the records the run trained on as auxiliary outliers.

    Compares manifest fingerprints with the one the run's config.json recorded for its --aux_data (as
    kood.train does), so a copy or a moved set is recognised too. Runs that trained without auxiliary
    data, or from before fingerprints were recorded, give none.

    Example:
        aux_set_warnings({"data_fingerprints": {"aux_data": "3f2a..."}}, {"tiny": "data/tiny300k"})
    """
    aux = ((config or {}).get("data_fingerprints") or {}).get("aux_data")
    if not aux:
        return []
    return [f"--ood={name}={directory} is the auxiliary training set of the run (its --aux_data): its numbers "
            f"will not be those of held-out OOD data"
            for name, directory in ood.items()
            if fingerprint(read_manifest_of(f"OOD set {name!r} (--ood) ", directory)) == aux]


# What each required flag takes (a bare "--ood is required" left the user to find the format and, for a
# demo run, where its OOD set is: a run dir does not record its --ood_data).
REQUIRED_FLAGS = {
    "model_dir": "the trained classifier, a kood.train --model_dir (its best.keras) or a .keras file",
    "ood": "the held-out OOD sets as NAME=DIR[,NAME=DIR...], e.g. --ood=svhn=data/svhn (for a run on the "
           "embedded demo: --ood=demo_ood=$HOME/.cache/kood/demo/ood)",
    "output": "the directory for results.{json,csv,md} and tensorboard/, e.g. --output=RUN_DIR/eval",
}


def run_from_flags(flags_values) -> dict:
    """Runs the evaluation described by parsed absl flags; returns the results (with scores)."""
    from kood.models import load_classifier
    from kood.rundir import resolve_model, run_finished, run_id_data, run_temperature

    for name, what in REQUIRED_FLAGS.items():
        if not getattr(flags_values, name):
            raise ConfigError(f"--{name} is required: {what}")
    check_output_dir(flags_values.output)  # before any scoring, not after
    resize = flags_values.resize
    if flags_values.center_crop:
        if resize not in ("error", "center_crop"):
            raise ConfigError(f"--center_crop conflicts with --resize={resize}")
        resize = "center_crop"
    try:
        params = json.loads(flags_values.detector_params) if flags_values.detector_params else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--detector_params is not valid JSON ({e}). Received: {flags_values.detector_params!r}")
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"--detector_params must be a JSON object of objects. Received: {flags_values.detector_params!r}")
    detectors = parse_detectors(flags_values.detectors)
    ood = parse_ood(flags_values.ood)
    groups = parse_groups(flags_values.ood_groups, list(ood))
    splits = ood_splits(flags_values.ood_split, list(ood))
    model_file, config = resolve_model(flags_values.model_dir)
    if not flags_values.id_data:  # as kood.export does
        flags_values.id_data = run_id_data(flags_values.model_dir, config)
    warnings = aux_set_warnings(config, ood)
    for warning in warnings:  # before the scoring, which can take a while
        print(f"warning: {warning}", file=sys.stderr)
    model = load_classifier(model_file)
    # The energy score (and --certify's) uses the T the run trained with, as kood.export does.
    run_t = run_temperature(config)
    if run_t is not None and "energy" in detectors and "temperature" not in params.get("energy", {}):
        params["energy"] = {**params.get("energy", {}), "temperature": run_t}
    results = evaluate(
        model, flags_values.id_data, ood, detectors, fit_dir=flags_values.fit_data, fit_split=flags_values.fit_split,
        id_split=flags_values.id_split, ood_split=splits, groups=groups, resize=resize,
        convention=flags_values.fpr_convention, batch_size=flags_values.batch_size, limit=flags_values.limit,
        fit_limit=flags_values.fit_limit, detector_params=params, certify=flags_values.certify,
        certify_options={"lipschitz_samples": flags_values.lipschitz_samples,
                         "lipschitz_radius": flags_values.lipschitz_radius, "temperature": run_t or 1.0},
        keep_scores=True)
    results["settings"].update(model_dir=flags_values.model_dir, model_file=os.path.abspath(model_file),
                               run_finished=run_finished(model_file), warnings=warnings)
    write_reports(results, flags_values.output)
    print(markdown_table(results))
    return results


def main(argv) -> None:
    from absl import flags

    from kood.errors import run_cli

    values = flags.FLAGS
    run_cli("kood.evaluate", argv, lambda: run_from_flags(values),
            data_dirs=lambda: [values.id_data, values.fit_data, *parse_ood(values.ood).values()])


if __name__ == "__main__":
    define_flags()
    run_app(main)
