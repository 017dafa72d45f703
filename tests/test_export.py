"""kood.export: the SavedModel serves the classifier's logits and a calibrated OOD decision.

A tiny MLP trained on sklearn digits (tests/eval_helpers.py) is put in a run dir with a kood
config.json, exported, and the export is loaded with `tf.saved_model.load` in a fresh process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from kood import export as export_lib
from kood.detectors import make_detector
from kood.errors import ConfigError, DataError
from kood.export import EXPORTABLE, calibrate_threshold, export_detector, graph_score
from kood.models import load_classifier
from kood.run import RunConfig
from kood.writer import write_arrays
from tests.eval_helpers import digits_arrays, noise_images, tiny_classifier, trained_digits_model
from tests.model_helpers import tiny_classifier as cnn_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TEMPERATURE = 2.0
NUM_VAL = 197  # tpr 0.95 -> k = ceil(187.15) = 188: the count is not a multiple of 20


def expected_accepted(n: int, tpr: float) -> int:
    """The documented rule: the smallest k with k / n >= tpr."""
    return next(k for k in range(1, n + 1) if k / n >= tpr)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A kood run dir (best.keras, last.keras, config.json with method energy, T=2) and its ID data."""
    root = tmp_path_factory.mktemp("export")
    x_train, y_train, x_test, y_test = digits_arrays()
    id_dir, rgb_dir, run_dir = str(root / "id"), str(root / "rgb"), str(root / "run")
    write_arrays(id_dir, {"train": (x_train, y_train), "val": (x_test[:NUM_VAL], y_test[:NUM_VAL]),
                          "test": (x_test[NUM_VAL:], y_test[NUM_VAL:])})
    write_arrays(rgb_dir, {"val": (noise_images(50, (8, 8, 3)), np.zeros(50, np.int64))}, num_classes=10)
    ood_dir = str(root / "ood")  # right shape, but kind=ood (num_classes 0)
    write_arrays(ood_dir, {"val": (noise_images(50), -np.ones(50, np.int64))}, kind="ood")
    os.makedirs(run_dir)
    model = trained_digits_model()
    model.save(os.path.join(run_dir, "best.keras"))
    tiny_classifier().save(os.path.join(run_dir, "last.keras"))  # untrained: tells the two apart
    config = dataclasses.asdict(RunConfig(model_dir=run_dir, id_data=id_dir, method="energy",
                                          method_overrides={"temperature": RUN_TEMPERATURE}))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return {"root": str(root), "id": id_dir, "rgb": rgb_dir, "ood": ood_dir, "run": run_dir, "model": model}


@pytest.fixture(scope="module")
def exported(run):
    out = os.path.join(run["root"], "export")
    info = export_detector(run["run"], out)
    return {"out": out, "info": info}


SERVE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    serve = loaded.signatures["serving_default"]
    arrays = np.load(sys.argv[2])
    result = {"threshold": loaded.threshold.numpy(), "detector": loaded.detector.numpy().decode()}
    for name in arrays.files:
        out = serve(images=tf.constant(arrays[name]))
        result.update({f"{name}/{k}": v.numpy() for k, v in out.items()})
    np.savez(sys.argv[3], **result)
""")


@pytest.fixture(scope="module")
def served(run, exported):
    """Outputs of the export's serving signature, computed in a fresh Python process."""
    _, _, x_test, _ = digits_arrays()
    images = {"val": x_test[:NUM_VAL], "test": x_test[NUM_VAL:], "noise": noise_images(300)}
    inputs, outputs = os.path.join(run["root"], "in.npz"), os.path.join(run["root"], "out.npz")
    np.savez(inputs, **images)
    proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, exported["out"], inputs, outputs],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(outputs) as f:
        return images, {k: f[k] for k in f.files}


SHAPES_SCRIPT = textwrap.dedent("""
    import json, sys, tensorflow as tf
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    result = {}
    for shape in json.loads(sys.argv[2]):
        try:
            out = serve(images=tf.zeros(shape, tf.uint8))
            result[str(shape)] = {k: [v.dtype.name, v.shape.as_list()] for k, v in out.items()}
        except Exception as e:
            result[str(shape)] = f"{type(e).__name__}: {getattr(e, 'message', e)}"
    print(json.dumps(result))
""")
SHAPES = [[3, 8, 8, 1], [0, 8, 8, 1], [2, 4, 4, 1], [2, 16, 16, 1], [8, 8, 1], [2, 8, 8, 3], [1, 8, 8, 1, 1]]


@pytest.fixture(scope="module")
def cnn_served(tmp_path_factory):
    """Outputs (dtype, shape) or error per image shape of `SHAPES`, served by a small_cnn export (8x8x1,
    3 classes) in a fresh process. A conv net: `run`'s MLP fails on most wrong sizes and handles 0 images anyway."""
    root = tmp_path_factory.mktemp("cnn_export")
    id_dir, model_file, out = str(root / "id"), str(root / "cnn.keras"), str(root / "export")
    write_arrays(id_dir, {"val": (noise_images(30), np.arange(30) % 3)}, num_classes=3)
    cnn_classifier().save(model_file)
    export_detector(model_file, out, id_data=id_dir)
    proc = subprocess.run([sys.executable, "-c", SHAPES_SCRIPT, out, json.dumps(SHAPES)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_serving_rejects_images_of_another_size_rank_or_channel_count(cnn_served):
    for shape in SHAPES[2:]:
        got = ",".join(map(str, shape))
        assert cnn_served[str(shape)].startswith("InvalidArgumentError"), (shape, cnn_served[str(shape)])
        assert f"Shape of tensor images [{got}] is not compatible with expected shape [?,8,8,1]" in \
            cnn_served[str(shape)], (shape, cnn_served[str(shape)])
        assert "images_must_have_the_model_input_size" in cnn_served[str(shape)]
    assert cnn_served[str(SHAPES[0])] == {"logits": ["float32", [3, 3]], "probabilities": ["float32", [3, 3]],
                                          "score": ["float32", [3]], "is_ood": ["bool", [3]]}


def test_serving_an_empty_batch_gives_empty_outputs(cnn_served):
    assert cnn_served[str([0, 8, 8, 1])] == {"logits": ["float32", [0, 3]], "probabilities": ["float32", [0, 3]],
                                             "score": ["float32", [0]], "is_ood": ["bool", [0]]}


def test_served_logits_probabilities_and_score_match_the_keras_model(run, served):
    images, out = served
    model = run["model"]
    for name, x in images.items():
        logits = model(x.astype(np.float32), training=False).numpy()
        np.testing.assert_allclose(out[f"{name}/logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[f"{name}/probabilities"], tf.nn.softmax(logits).numpy(), atol=1e-6)
        expected = make_detector("energy", model, temperature=RUN_TEMPERATURE).score_outputs({"logits": logits})
        np.testing.assert_allclose(out[f"{name}/score"], expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(out[f"{name}/is_ood"], out[f"{name}/score"] > out["threshold"])
    assert str(out["detector"]) == "energy"


def test_threshold_accepts_exactly_the_documented_count_of_calibration_images(exported, served):
    _, out = served
    info = exported["info"]
    k = expected_accepted(NUM_VAL, 0.95)
    assert k == math.ceil(0.95 * NUM_VAL) == 188
    assert int(np.sum(~out["val/is_ood"])) == k
    assert info["calibration"] == {**info["calibration"], "split": "val", "count": NUM_VAL, "accepted": k}
    assert out["threshold"] == np.float32(info["threshold"])
    # just above the k-th score (kood.evaluate's FPR95 rule), with a margin against float noise
    scores = np.sort(out["val/score"])
    assert scores[k - 1] < info["threshold"] < scores[k]
    assert info["threshold"] - scores[k - 1] <= 1e-5 * max(1.0, abs(scores[k - 1])) * 1.01


def test_uniform_noise_is_flagged_far_more_often_than_id(served):
    _, out = served
    id_rate, noise_rate = float(np.mean(out["test/is_ood"])), float(np.mean(out["noise/is_ood"]))
    # measured on this model: noise 96% flagged, ID test split 9.5% (200 images other than the
    # calibration ones, so only about 5%); the bounds leave room for another TF/CPU
    assert noise_rate >= 0.8, noise_rate
    assert id_rate <= 0.2, id_rate
    assert noise_rate > id_rate + 0.6


def test_detector_json_records_score_temperature_calibration_and_classes(run, exported):
    out, info = exported["out"], exported["info"]
    with open(os.path.join(out, "detector.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(info))
    assert saved["detector"] == "energy" and saved["temperature"] == RUN_TEMPERATURE
    assert saved["temperature_from"] == "run config.json"
    assert saved["tpr"] == 0.95
    assert saved["calibration"]["id_data"] == run["id"] and saved["calibration"]["held_out"] is True
    assert saved["calibration"]["id_accuracy"] > 0.8
    assert saved["input"] == {"shape": [None, 8, 8, 1], "dtype": "uint8", "name": "images"}
    assert saved["class_names"] == [str(i) for i in range(10)] and saved["num_classes"] == 10
    assert saved["model"]["file"] == os.path.join(run["run"], "best.keras")
    leftovers = [n for n in os.listdir(run["root"]) if ".partial-" in n or ".old-" in n]
    assert leftovers == []


def test_keras_file_reloads_with_load_classifier(run, exported):
    model = load_classifier(os.path.join(exported["out"], "classifier.keras"))
    x = digits_arrays()[2][:20].astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), run["model"](x).numpy(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_graph_scores_match_the_numpy_detectors(name):
    logits = np.random.default_rng(0).normal(0, 3, (64, 10)).astype(np.float32)
    params = {"energy": {"temperature": 1.5}, "gen": {"gamma": 0.2, "top_m": 5}}.get(name, {})
    expected = make_detector(name, trained_digits_model(), **params).score_outputs({"logits": logits})
    np.testing.assert_allclose(graph_score(name, tf.constant(logits), params).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,tpr", [(20, 0.95), (197, 0.95), (1000, 0.9), (7, 0.5), (3, 0.99)])
def test_calibrate_threshold_accepts_k_of_n(n, tpr):
    scores = np.random.default_rng(n).normal(size=n).astype(np.float32)
    threshold = calibrate_threshold(scores, tpr)
    assert int(np.sum(scores <= np.float32(threshold))) == expected_accepted(n, tpr)


def test_calibrate_threshold_margin_is_small_and_below_the_next_score():
    assert calibrate_threshold(np.arange(20.0), 0.95) == pytest.approx(18.0 + 18.0 * 1e-5, rel=1e-6)
    close = np.array([1.0, 2.0, np.nextafter(np.float32(2.0), np.float32(3.0))], np.float32)
    assert calibrate_threshold(close, 0.6) == 2.0  # adjacent floats: no room for a margin
    tight = np.array([1.0, 2.0, 2.0 + 1e-6], np.float32)
    assert 2.0 < calibrate_threshold(tight, 0.6) < tight[2]  # half the gap


def test_calibrate_threshold_with_ties_accepts_the_whole_tie():
    scores = np.array([0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4], np.float32)
    threshold = calibrate_threshold(scores, 0.5)  # k = 10 falls in the tie at 3
    assert 3 < threshold < 3.001 and int(np.sum(scores <= threshold)) == 19


def test_last_checkpoint_and_other_detector(run, tmp_path):
    info = export_detector(run["run"], str(tmp_path / "msp"), checkpoint="last", detector="msp", tpr=0.9,
                           calib_split="test")
    assert info["model"]["file"].endswith("last.keras") and info["detector"] == "msp"
    assert info["temperature"] is None and info["hyperparams"] == {}
    n = len(digits_arrays()[2]) - NUM_VAL
    assert info["calibration"]["accepted"] == expected_accepted(n, 0.9)


def test_overwrite_replaces_an_earlier_export(run, tmp_path):
    out = str(tmp_path / "export")
    export_detector(run["run"], out, detector="max_logit")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_detector(run["run"], out, detector="msp")
    info = export_detector(run["run"], out, detector="msp", overwrite=True)
    with open(os.path.join(out, "detector.json")) as f:
        assert json.load(f)["detector"] == info["detector"] == "msp"
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_that_is_not_an_export_is_never_replaced(run, tmp_path, overwrite):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a kood export .* not even with --overwrite: choose another --out") as e:
        export_detector(run["run"], str(tmp_path), overwrite=overwrite)
    assert "pass --overwrite" not in str(e.value)  # it would not help
    with pytest.raises(ConfigError, match="not a kood export"):  # nor a file
        export_detector(run["run"], str(tmp_path / "notes.txt"), overwrite=overwrite)
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_empty_existing_directory_is_used(run, tmp_path, monkeypatch, overwrite):
    out = tmp_path / "export"
    out.mkdir()
    with monkeypatch.context() as m:  # except the current directory: it cannot be renamed away
        m.chdir(out)
        with pytest.raises(ConfigError, match=r"--out=\. is the current directory"):
            export_detector(run["run"], ".", detector="max_logit", overwrite=overwrite)
    info = export_detector(run["run"], str(out), detector="max_logit", overwrite=overwrite)
    with open(out / "detector.json") as f:
        assert json.load(f)["threshold"] == info["threshold"]
    assert os.listdir(tmp_path) == ["export"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_export_leaves_nothing_complete_looking(run, tmp_path, monkeypatch, overwrite):
    out = str(tmp_path / "export")
    if overwrite:
        export_detector(run["run"], out, detector="max_logit")
    real_save = tf.saved_model.save

    def save_then_interrupt(module, path, signatures=None):
        real_save(module, path, signatures=signatures)
        raise KeyboardInterrupt  # as a Ctrl-C after the SavedModel is written

    monkeypatch.setattr(export_lib.tf.saved_model, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_detector(run["run"], out, detector="msp", overwrite=overwrite)
    if overwrite:  # the earlier export is untouched
        with open(os.path.join(out, "detector.json")) as f:
            assert json.load(f)["detector"] == "max_logit"
        assert sorted(os.listdir(tmp_path)) == ["export"]
    else:
        assert os.listdir(tmp_path) == []


def test_calibrating_on_the_training_split_warns_and_is_recorded(run, tmp_path, capsys):
    info = export_detector(run["run"], str(tmp_path / "out"), calib_split="train", detector="max_logit")
    assert "warning: calibrating on the training split 'train'" in capsys.readouterr().err
    assert info["calibration"]["held_out"] is False


def test_other_id_data_than_the_runs_warns_but_a_copy_does_not(run, tmp_path, capsys):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(run["id"], copy)
    info = export_detector(run["run"], str(tmp_path / "a"), id_data=copy, detector="max_logit")
    assert "is not the ID data of the run" not in capsys.readouterr().err
    assert info["model"]["run_finished"] is False  # the fixture's run dir has no results.json
    other = str(tmp_path / "other")  # same shape and classes, other images
    x_train, y_train, x_test, y_test = digits_arrays()
    write_arrays(other, {"val": (x_test[::-1][:NUM_VAL], y_test[::-1][:NUM_VAL])})
    export_detector(run["run"], str(tmp_path / "b"), id_data=other, detector="max_logit")
    assert f"--id_data={other} is not the ID data of the run ({run['id']}" in capsys.readouterr().err


def test_bare_keras_file_needs_id_data(run, tmp_path):
    path = str(tmp_path / "model.keras")
    run["model"].save(path)
    with pytest.raises(ConfigError, match="--id_data is required"):
        export_detector(path, str(tmp_path / "out"))
    info = export_detector(path, str(tmp_path / "out"), id_data=run["id"])
    assert info["temperature"] == 1.0 and "no run config" in info["temperature_from"]
    assert info["model"]["checkpoint"] is None


BAD_INPUTS = [
    (dict(model_path="{root}/missing"), DataError, "does not exist"),
    (dict(model_path="{root}"), DataError, "has no best.keras"),
    (dict(model_path="{run}/config.json"), DataError, "a kood run dir or a .keras file"),
    (dict(calib_split="holdout"), DataError, "no split 'holdout'"),
    (dict(id_data="{rgb}"), DataError, r"holds \[8, 8, 3\] images but the model .* takes \[8, 8, 1\]"),
    (dict(id_data="{ood}"), DataError, r"--id_data=.*ood is a 'ood' set \(kind in its manifest.json\)"),
    (dict(detector="nope"), ConfigError, "Unknown detector. Exportable"),
    (dict(detector="knn"), ConfigError, "'knn' cannot be exported .* needs ID fit data"),
    (dict(detector="odin"), ConfigError, "'odin' cannot be exported .* input gradients"),
    (dict(tpr=0.0), ConfigError, r"--tpr must be in \(0, 1\)"),
    (dict(tpr=1.0), ConfigError, r"--tpr must be in \(0, 1\)"),
    (dict(tpr=1.5), ConfigError, r"--tpr must be in \(0, 1\)"),
    (dict(detector_params={"temperature": -1.0}), ConfigError, "temperature` must be a number > 0"),
    (dict(detector="msp", detector_params={"temperature": 2.0}), ConfigError, "msp: bad hyperparameter"),
    (dict(checkpoint="final"), ConfigError, "--checkpoint must be one of"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS, ids=[m[:24] for _, _, m in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_writes_nothing(run, tmp_path, kwargs, error, message):
    kwargs = {k: v.format(**run) if isinstance(v, str) else v for k, v in kwargs.items()}
    model_path = kwargs.pop("model_path", run["run"])
    with pytest.raises(error, match=message):
        export_detector(model_path, str(tmp_path / "out"), **kwargs)
    assert os.listdir(tmp_path) == []


def test_run_config_naming_a_missing_id_data_is_a_data_error(run, tmp_path):
    run_dir = tmp_path / "moved_run"
    run_dir.mkdir()
    run["model"].save(str(run_dir / "best.keras"))
    (run_dir / "config.json").write_text(json.dumps({"method": "ce", "id_data": "data/digits"}))
    with pytest.raises(DataError, match="names id_data='data/digits', which is not a directory here; pass --id_data"):
        export_detector(str(run_dir), str(tmp_path / "out"))


def test_class_count_mismatch_is_a_data_error(run, tmp_path):
    five = str(tmp_path / "five")
    x, y = digits_arrays()[2:]
    write_arrays(five, {"val": (x[y < 5], y[y < 5])}, num_classes=5)
    with pytest.raises(DataError, match="has 5 classes but the model .* has 10 outputs"):
        export_detector(run["run"], str(tmp_path / "out"), id_data=five)


def test_no_held_out_split_is_a_data_error(run, tmp_path):
    train_only = str(tmp_path / "train_only")
    x, y = digits_arrays()[:2]
    write_arrays(train_only, {"train": (x[:100], y[:100])}, num_classes=10)
    with pytest.raises(DataError, match="no held-out split .* pass --calib_split"):
        export_detector(run["run"], str(tmp_path / "out"), id_data=train_only)


def test_cli_reports_bad_flags_with_exit_code_2(run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kood.export", f"--model_dir={run['run']}",
                           f"--out={tmp_path / 'out'}", "--tpr=1.2"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "kood.export: error: ConfigError: --tpr must be in (0, 1)" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_cli_exports_a_real_training_run(tmp_path):
    """kood.train's run dir -> python -m kood.export -> served decisions (~30 s)."""
    from kood import run as run_lib
    from tests.train_helpers import make_digit_sets

    dirs = make_digit_sets(str(tmp_path / "data"))
    model_dir, out = str(tmp_path / "run"), str(tmp_path / "export")
    run_lib.run_training(RunConfig(model_dir=model_dir, id_data=dirs["id"], method="ce", epochs=3, batch_size=32,
                                   lr=0.05, verbose=0))
    proc = subprocess.run([sys.executable, "-m", "kood.export", f"--model_dir={model_dir}", f"--out={out}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO:" not in proc.stderr  # TF's SavedModel writer's absl INFO lines are hidden (kood.errors.run_cli)
    with open(os.path.join(out, "detector.json")) as f:
        info = json.load(f)
    n = info["calibration"]["count"]
    assert info["calibration"]["split"] == "test" and info["calibration"]["accepted"] == expected_accepted(n, 0.95)
    assert info["model"]["method"] == "ce" and info["temperature_from"] == "run config.json"
    assert f"accepts {expected_accepted(n, 0.95)}/{n}" in proc.stdout


def test_an_export_killed_while_replacing_another_loses_neither(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "export"
    export_detector(run["run"], str(out), detector="max_logit")
    # killed between moving the old export aside and moving the new one in: --out is gone
    shutil.move(str(out), str(tmp_path / ".export.old-0badc0de" / "export"))
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_detector(run["run"], str(out), detector="energy")
    assert "note: restoring" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert json.loads((out / "detector.json").read_text())["detector"] == "max_logit"
    # killed after the new export was in place, before the old one was removed
    shutil.copytree(str(out), str(tmp_path / ".export.old-1badc0de" / "export"))
    export_detector(run["run"], str(out), detector="energy", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert json.loads((out / "detector.json").read_text())["detector"] == "energy"


def test_partial_exports_of_killed_runs_are_removed_but_not_one_in_use(run, tmp_path, capsys):
    from tests.data_helpers import held_elsewhere

    killed = tmp_path / ".export.partial-0badc0de"  # what SIGKILL leaves: the temp dir, no lock holder
    (killed / "variables").mkdir(parents=True)
    running = tmp_path / ".export.partial-1234abcd"
    other = held_elsewhere(str(running))  # another export writing right now
    export_detector(run["run"], str(tmp_path / "export"), detector="max_logit")
    assert sorted(os.listdir(tmp_path)) == [".export.partial-1234abcd", "export"]
    assert f"note: removing {killed}, a partial export left by an interrupted run" in capsys.readouterr().err
    assert ".kood-writing.lock" not in os.listdir(tmp_path / "export")
    other.close()


def test_a_finished_export_being_published_is_not_removed_by_a_concurrent_one(run, tmp_path, monkeypatch):
    """Its temp dir stays locked until it is --out: another export's clean-up of partial exports (another
    process, started meanwhile) must skip it, or it deletes the export being renamed into place."""
    import subprocess
    import sys

    from kood import export as export_lib

    out = tmp_path / "export"
    publish = export_lib._publish
    seen = []

    def concurrent_cleanup_then_publish(tmp, out_, overwrite):
        code = ("import sys; from kood.writer import remove_abandoned; "
                "remove_abandoned(sys.argv[1], sys.argv[2], keep=sys.argv[1], what='a partial export')")
        subprocess.run([sys.executable, "-c", code, str(tmp_path), ".export.partial-"], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
        seen.append(os.path.isfile(os.path.join(tmp, "detector.json")))
        return publish(tmp, out_, overwrite)

    monkeypatch.setattr(export_lib, "_publish", concurrent_cleanup_then_publish)
    export_detector(run["run"], str(out), detector="max_logit")
    assert seen == [True]
    assert sorted(os.listdir(tmp_path)) == ["export"] and ".kood-writing.lock" not in os.listdir(out)
    assert json.loads((out / "detector.json").read_text())["detector"] == "max_logit"


def test_the_interrupted_replacement_of_another_out_is_not_restored_into_this_one(run, tmp_path):
    # an export to --out=export.old-x killed inside _publish left `.export.old-x.old-*`: not this --out's
    other = tmp_path / ".export.old-x.old-0badc0de" / "export"
    other.mkdir(parents=True)
    (other / "detector.json").write_text("{}")
    export_detector(run["run"], str(tmp_path / "export"), detector="max_logit")
    assert json.loads((tmp_path / "export" / "detector.json").read_text())["detector"] == "max_logit"
    assert (other / "detector.json").read_text() == "{}"
