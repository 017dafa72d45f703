"""kood.evaluate (library, flag parsing, CLI end to end) and kood.certify."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kood import certify, evaluate
from kood.data import limit_indices
from kood.errors import ConfigError, DataError
from kood.writer import write_arrays
from tests.eval_helpers import digits_arrays, noise_images, trained_digits_model, write_eval_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_eval_sets(str(tmp_path_factory.mktemp("eval")))


def test_parse_ood_and_groups():
    assert evaluate.parse_ood("svhn=/a, textures=/b") == {"svhn": "/a", "textures": "/b"}
    for bad in ("svhn", "svhn=", "=/a", "a=/x,a=/y", ""):
        with pytest.raises(ConfigError, match="--ood"):
            evaluate.parse_ood(bad)
    assert evaluate.parse_groups("near=a;far=b,c", ["a", "b", "c"]) == {"near": ["a"], "far": ["b", "c"]}
    with pytest.raises(ConfigError, match=r"\['d'\]"):
        evaluate.parse_groups("near=a,d", ["a"])
    with pytest.raises(ConfigError, match="--ood_groups"):
        evaluate.parse_groups("near", ["a"])


def test_unknown_detector_lists_known():
    with pytest.raises(ConfigError, match=r"Unknown detector\(s\) \['engery'\]. Known: .*'energy'"):
        evaluate.parse_detectors("msp,engery")


def test_evaluate_library(sets):
    model = trained_digits_model()
    r = evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["energy", "mahalanobis"],
                          groups={"far": ["noise"]}, limit=150, keep_scores=True)
    assert r["settings"]["counts"] == {"id": 150, "fit": 1400, "ood": {"noise": 150}}  # mahalanobis: fitted on all
    assert r["id_accuracy"] > 0.85
    for det in ("energy", "mahalanobis"):
        m = r["detectors"][det]["sets"]["noise"]
        assert m["auroc"] > 0.85 and m["fpr95"] < 0.5
        assert r["detectors"][det]["groups"]["far"] == m
    # the OOD-positive convention changes FPR95 but not AUROC
    r2 = evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["energy"], limit=150, convention="ood",
                           keep_scores=True)
    s = r2["scores"]["energy"]
    flagged = np.mean(s["id"] >= -np.sort(-s["noise"])[int(np.ceil(0.95 * 150)) - 1])
    assert r2["detectors"]["energy"]["sets"]["noise"]["fpr95"] == pytest.approx(flagged)
    assert r2["detectors"]["energy"]["sets"]["noise"]["auroc"] == r["detectors"]["energy"]["sets"]["noise"]["auroc"]
    assert "OOD is positive" in evaluate.markdown_table(r2)


def test_limits_score_a_seeded_spread_subset_and_the_header_says_so(sets, tmp_path):
    # the ID sets stored sorted by class, as sets converted from class folders are: the first 100 images
    # would hold 3 classes
    x_train, y_train, x_test, y_test = digits_arrays()
    by_class = str(tmp_path / "by_class")
    train_order, test_order = np.argsort(y_train, kind="stable"), np.argsort(y_test, kind="stable")
    write_arrays(by_class, {"train": (x_train[train_order], y_train[train_order]),
                            "test": (x_test[test_order], y_test[test_order])})
    model = trained_digits_model()
    r = evaluate.evaluate(model, by_class, {"noise": sets["noise"]}, ["energy", "knn"], limit=100, fit_limit=60,
                          keep_scores=True)
    assert r["settings"]["counts"] == {"id": 100, "fit": 60, "ood": {"noise": 100}}
    assert r["settings"]["split_sizes"] == {"id": 397, "fit": 1400, "ood": {"noise": 200}}
    assert r["settings"]["limit_seed"] == 0
    # the subset is spread over the split (so over the classes), not its first 100 images
    full = evaluate.evaluate(model, by_class, {"noise": sets["noise"]}, ["energy"], keep_scores=True)
    np.testing.assert_allclose(r["scores"]["energy"]["id"],
                               full["scores"]["energy"]["id"][limit_indices(397, 100)], rtol=1e-5)
    assert len(np.unique(y_test[test_order][limit_indices(397, 100)])) == 10
    again = evaluate.evaluate(model, by_class, {"noise": sets["noise"]}, ["energy", "knn"], limit=100, fit_limit=60,
                              keep_scores=True)
    np.testing.assert_array_equal(again["scores"]["knn"]["id"], r["scores"]["knn"]["id"])  # the same every run
    assert ("Images scored: ID 100 of 397, fit 60 of 1400, noise 100 of 200 (--limit=100, --fit_limit=60: a "
            "random subset of at most that many images per set, drawn with the fixed seed 0, the same every run)"
            in evaluate.markdown_table(r))
    assert "Images scored: ID 397, noise 200\n" in evaluate.markdown_table(full)
    assert full["settings"]["limit_seed"] is None and full["settings"]["counts"]["fit"] is None


def test_size_mismatch_needs_resize(sets):
    model = trained_digits_model()
    for name in ("big", "rgb"):
        with pytest.raises(DataError, match=f"OOD set '{name}' \\(--ood\\) {sets[name]}: images .*--resize=resize"):
            evaluate.evaluate(model, sets["id"], {name: sets[name]}, ["msp"])
    r = evaluate.evaluate(model, sets["id"], {"big": sets["big"]}, ["msp"], resize="center_crop", limit=50)
    assert r["settings"]["counts"]["ood"]["big"] == 50


def test_missing_fit_data(sets, tmp_path):
    x_train, y_train, x_test, y_test = digits_arrays()
    test_only = str(tmp_path / "test_only")
    write_arrays(test_only, {"test": (x_test, y_test)})
    model = trained_digits_model()
    with pytest.raises(DataError, match=r"\['knn'\] need ID fit data.*--fit_data"):
        evaluate.evaluate(model, test_only, {"noise": sets["noise"]}, ["energy", "knn"])
    # no detector needs fit data: the test-only set is enough
    evaluate.evaluate(model, test_only, {"noise": sets["noise"]}, ["energy"], limit=20)
    # fit data from another directory
    r = evaluate.evaluate(model, test_only, {"noise": sets["noise"]}, ["knn"], fit_dir=sets["id"], limit=50,
                          detector_params={"knn": {"k": 5}})
    assert r["detectors"]["knn"]["hyperparams"] == {"k": 5} and r["settings"]["fit_data"] == sets["id"]
    assert f"Fit data: {sets['id']} (split train)" in evaluate.markdown_table(r)  # not only in results.json


def test_fit_data_must_be_id_data(sets, tmp_path):
    x_train, y_train, _, _ = digits_arrays()
    outliers, synthetic = str(tmp_path / "outliers"), str(tmp_path / "synthetic")
    write_arrays(outliers, {"train": (noise_images(50), -np.ones(50, np.int64))}, kind="outlier")
    write_arrays(synthetic, {"train": (x_train[:200], y_train[:200])}, kind="synthetic")
    model = trained_digits_model()
    # refused before any reading: the 16x16 OOD set without --resize would fail otherwise
    with pytest.raises(DataError, match=f"--fit_data={outliers} is a set of kind 'outlier' .*detectors "
                                        r"\['knn', 'mahalanobis'\] are fitted on ID training data"):
        evaluate.evaluate(model, sets["id"], {"big": sets["big"]}, ["energy", "knn", "mahalanobis"], fit_dir=outliers)
    with pytest.raises(DataError, match=f"--id_data={sets['noise']} \\(the default --fit_data\\) is a set of "
                                        "kind 'ood'"):
        evaluate.evaluate(model, sets["noise"], {"noise": sets["noise"]}, ["knn"])
    # synthetic ID data is ID data; a detector that needs no fit ignores the fit set
    r = evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["knn", "mahalanobis"], fit_dir=synthetic,
                          limit=20, detector_params={"knn": {"k": 5}})
    assert r["settings"]["fit_data"] == synthetic
    r = evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["energy"], fit_dir=outliers, limit=20)
    assert r["settings"]["fit_data"] is None and "Fit data" not in evaluate.markdown_table(r)


def test_missing_split_names_the_flag_that_reads_another(sets, tmp_path):
    train_only = str(tmp_path / "k")
    write_arrays(train_only, {"train": (noise_images(30), -np.ones(30, np.int64))}, kind="ood")
    model = trained_digits_model()
    with pytest.raises(DataError, match=f"OOD set 'k' \\(--ood\\) {train_only}: no split 'test'; it has "
                                        r"\['train'\]. To read another split, pass --ood_split=k=train$"):
        evaluate.evaluate(model, sets["id"], {"k": train_only}, ["energy"])
    r = evaluate.evaluate(model, sets["id"], {"k": train_only}, ["energy"], ood_split="train", limit=20)
    assert r["settings"]["counts"]["ood"]["k"] == 20
    # one evaluation over a test-only and a train-only set: the split per set
    r = evaluate.evaluate(model, sets["id"], {"noise": sets["noise"], "k": train_only}, ["energy"],
                          ood_split="k=train", limit=20)
    assert r["settings"]["ood_split"] == {"noise": "test", "k": "train"}
    assert f"noise={sets['noise']}, k={train_only} (split train)" in evaluate.markdown_table(r)
    assert evaluate.ood_splits("val,k=train", ["a", "k"]) == {"a": "val", "k": "train"}
    for bad, message in (("test,val", "one split for all sets"), ("x=train", r"names \['x'\], which --ood does not")):
        with pytest.raises(ConfigError, match=message):
            evaluate.ood_splits(bad, ["a", "k"])
    with pytest.raises(DataError, match=r"it has \['test', 'train'\]. To read another split, pass "
                                        "--id_split=NAME, NAME one of them"):
        evaluate.evaluate(model, sets["id"], {"k": train_only}, ["energy"], id_split="val")


def test_cli_end_to_end(sets, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "kood.evaluate", f"--model_dir={sets['model']}", f"--id_data={sets['id']}",
           f"--ood=noise={sets['noise']},rgb={sets['rgb']}", "--resize=resize", "--ood_groups=far=noise,rgb",
           "--detectors=energy,odin,knn", '--detector_params={"knn": {"k": 10}}', f"--output={out}",
           "--certify", "--limit=100", "--batch_size=64"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Convention: FPR95: ID is positive" in proc.stdout and "| knn | rgb |" in proc.stdout
    assert "first-order proxy" in proc.stdout
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["detectors"]) == {"energy", "odin", "knn"}
    assert results["certify"]["id"]["median_radius"] > 0 and results["certify"]["id"]["count"] == 100
    rows = open(os.path.join(out, "results.csv")).read().splitlines()
    assert len(rows) == 1 + 3 * 4  # header + (2 sets + 1 group + average) per detector
    knn_noise = [r for r in rows if r.startswith("knn,set,noise,")][0].split(",")
    assert float(knn_noise[4]) == pytest.approx(results["detectors"]["knn"]["sets"]["noise"]["auroc"])
    tags = set()
    tb = os.path.join(out, "tensorboard")
    for f in os.listdir(tb):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(tb, f)):
            tags.update(v.tag for v in event.summary.value)
    assert {"energy/scores/id", "energy/scores/rgb", "knn/roc", "odin/pr"} <= tags
    bad = subprocess.run(cmd[:5] + ["--ood=noise", f"--output={out}2"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "error: ConfigError: --ood must be NAME=DIR" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not os.path.exists(os.path.join(out + "2", "results.json"))


def test_certified_radius_math():
    r = certify.certified_radius([-5.0, -2.0, -4.0], [2.0, 1.0, 0.5], gamma=-3.0, is_id=True)
    np.testing.assert_allclose(r, [1.0, np.nan, 2.0])
    r = certify.certified_radius([-5.0, -2.0], [2.0, 4.0], gamma=-3.0, is_id=False)
    np.testing.assert_allclose(r, [np.nan, 0.25])


def test_score_gradient_spaces_and_sampling():
    from kood.models import normalized_model

    model = trained_digits_model()
    x = noise_images(8, seed=5).astype(np.float32)
    s, n_norm = certify.ScoreGradient(model, space="normalized")(x)
    _, n_pix = certify.ScoreGradient(model, space="pixels")(x)
    # independent path: differentiate the normalized-input model directly
    net = normalized_model(model)
    xn = model.get_layer("normalize")(tf.constant(x))
    with tf.GradientTape() as tape:
        tape.watch(xn)
        total = tf.reduce_sum(-tf.reduce_logsumexp(net(xn, training=False)["logits"], axis=1))
    want = np.linalg.norm(tape.gradient(total, xn).numpy().reshape(8, -1), axis=1)
    np.testing.assert_allclose(n_norm, want, rtol=1e-4)
    std = float(np.sqrt(np.asarray(model.get_layer("normalize").variance)).ravel()[0])
    np.testing.assert_allclose(n_pix * std, n_norm, rtol=1e-4)
    sampled = certify.ScoreGradient(model).sampled_lipschitz(x, radius=0.5, num_samples=3)
    assert np.all(sampled >= n_norm - 1e-6)
    with pytest.raises(ConfigError, match="space"):
        certify.ScoreGradient(model, space="logits")


def _flag_values(**kw):
    """What kood.evaluate's CLI passes to run_from_flags: its flag defaults, overridden by `kw`."""
    import types

    defaults = dict(detectors="energy,msp", fit_data=None, fit_split="train", id_split="test", ood_split="test",
                    ood_groups=None, resize="error", center_crop=False, fpr_convention="id", detector_params=None,
                    certify=False, lipschitz_samples=0, lipschitz_radius=0.1, batch_size=256, limit=None,
                    fit_limit=None)
    return types.SimpleNamespace(**{**defaults, **kw})

def test_energy_and_certify_use_the_run_temperature(sets, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(sets["model"], run / "best.keras")
    (run / "config.json").write_text(json.dumps({"method": "energy", "method_overrides": {"temperature": 2.5}}))
    values = _flag_values(model_dir=str(run), id_data=sets["id"], ood=f"noise={sets['noise']}", detectors="energy,msp",
                          output=str(tmp_path / "out"), certify=True, limit=40)
    results = evaluate.run_from_flags(values)
    assert results["detectors"]["energy"]["hyperparams"] == {"temperature": 2.5}
    assert results["certify"]["temperature"] == 2.5
    assert "the run has not finished" in capsys.readouterr().err  # no results.json yet
    assert results["settings"]["run_finished"] is False
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"Model: {run / 'best.keras'} (from a run that had not finished)" in table
    assert f"ID data: {sets['id']} (split test); OOD: noise={sets['noise']}" in table
    (run / "results.json").write_text("{}")
    values.detector_params, values.certify, values.output = '{"energy": {"temperature": 1.0}}', False, str(tmp_path / "o2")
    results = evaluate.run_from_flags(values)
    assert results["detectors"]["energy"]["hyperparams"] == {"temperature": 1.0}  # an explicit T wins
    assert "has not finished" not in capsys.readouterr().err
    assert results["settings"]["run_finished"] is True
    assert "had not finished" not in (tmp_path / "o2" / "results.md").read_text()


def test_an_ood_set_that_is_the_runs_auxiliary_set_is_warned_about(sets, tmp_path, capsys):
    import shutil

    from kood.manifest import fingerprint, read_manifest

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(sets["model"], run / "best.keras")
    (run / "results.json").write_text("{}")
    aux = str(tmp_path / "aux_copy")  # a copy of the run's aux set: the same records at another path
    shutil.copytree(sets["noise"], aux)
    other = str(tmp_path / "other")
    write_arrays(other, {"test": (noise_images(30, seed=7), -np.ones(30, np.int64))}, kind="ood")
    (run / "config.json").write_text(json.dumps({"method": "energy", "aux_data": "/elsewhere/noise",
                                                 "data_fingerprints": {"aux_data": fingerprint(read_manifest(aux))}}))
    values = _flag_values(model_dir=str(run), id_data=sets["id"], ood=f"aux={aux},other={other}",
                          output=str(tmp_path / "out"), limit=20)
    results = evaluate.run_from_flags(values)
    warning = f"--ood=aux={aux} is the auxiliary training set of the run (its --aux_data)"
    err = capsys.readouterr().err
    assert f"warning: {warning}" in err and "--ood=other" not in err
    assert f"Warning: {warning}" in (tmp_path / "out" / "results.md").read_text()
    assert results["settings"]["warnings"] == [f"{warning}: its numbers will not be those of held-out OOD data"]
    # a run without auxiliary data (no aux fingerprint recorded): no warning
    (run / "config.json").write_text(json.dumps({"method": "ce", "data_fingerprints": {"id_data": "x"}}))
    values.output = str(tmp_path / "out2")
    assert evaluate.run_from_flags(values)["settings"]["warnings"] == []
    assert "auxiliary training set" not in capsys.readouterr().err


def test_run_temperature_reads_old_configs_that_todays_checks_refuse():
    from kood.rundir import run_temperature

    old = {"method": "ce", "method_overrides": {"aux_batch_factor": 2.0}}  # refused for new runs since 2026-11-30
    assert run_temperature(old) == 1.0
    assert run_temperature({"method": "energy", "method_overrides": {"temperature": 3.0}}) == 3.0
    with pytest.raises(DataError, match="unknown method 'nope'"):
        run_temperature({"method": "nope"})


def test_a_missing_required_flag_says_what_it_takes(tmp_path):
    # was a bare "--ood is required": neither the NAME=DIR format nor, for a demo run, where its OOD set is
    values = _flag_values(model_dir=str(tmp_path), ood=None, output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"--ood is required: .*NAME=DIR.*demo_ood=\$HOME/.cache/kood/demo/ood"):
        evaluate.run_from_flags(values)
    with pytest.raises(ConfigError, match=r"--output is required: the directory for results"):
        evaluate.run_from_flags(_flag_values(model_dir=str(tmp_path), ood="a=b", output=None))


def test_id_data_defaults_to_the_runs(sets, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(sets["model"], run / "best.keras")
    (run / "config.json").write_text(json.dumps({"method": "energy"}))
    values = _flag_values(model_dir=str(run), id_data=None, ood=f"noise={sets['noise']}", output=str(tmp_path / "o"),
                          limit=20)
    with pytest.raises(ConfigError, match="--id_data is required: .* has no run config.json naming its ID data"):
        evaluate.run_from_flags(values)
    (run / "config.json").write_text(json.dumps({"method": "energy", "id_data": sets["id"]}))
    assert evaluate.run_from_flags(values)["settings"]["id_data"] == sets["id"]


def test_truncated_ood_file_is_named_without_a_traceback(sets, tmp_path):
    import glob
    import shutil

    damaged = str(tmp_path / "noise")
    shutil.copytree(sets["noise"], damaged)
    shard = sorted(glob.glob(os.path.join(damaged, "*.tfrecord")))[0]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    cmd = [sys.executable, "-m", "kood.evaluate", f"--model_dir={sets['model']}", f"--id_data={sets['id']}",
           f"--ood=noise={damaged}", "--detectors=energy", f"--output={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"kood.evaluate: error: DataError: {shard}: " in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_reports_are_strict_json_and_a_rerun_replaces_the_tensorboard_events(sets, tmp_path):
    from kood.models import load_classifier

    out = str(tmp_path / "out")
    model = load_classifier(sets["model"])
    results = evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["energy"], limit=40, keep_scores=True)
    results["detectors"]["energy"]["sets"]["noise"]["auroc"] = float("nan")  # e.g. a degenerate score
    evaluate.write_reports(results, out)
    events = os.listdir(os.path.join(out, "tensorboard"))
    text = open(os.path.join(out, "results.json")).read()
    assert "NaN" not in text and json.loads(text)["detectors"]["energy"]["sets"]["noise"]["auroc"] is None
    evaluate.write_reports(evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["msp"], limit=40,
                                             keep_scores=True), out)
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1
    assert os.listdir(os.path.join(out, "tensorboard")) != events


def test_output_that_is_a_file_stops_before_any_scoring(sets, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    values = _flag_values(model_dir=sets["model"], id_data=sets["id"], ood=f"noise={sets['noise']}",
                          output=str(a_file), detectors="no_such_detector")  # would fail later, if reached
    with pytest.raises(DataError, match="--output=.*a_file is a file, not a directory"):
        evaluate.run_from_flags(values)


def test_a_rerun_killed_while_writing_reports_leaves_no_complete_looking_mix(sets, tmp_path, monkeypatch):
    from kood.models import load_classifier

    out = str(tmp_path / "out")
    model = load_classifier(sets["model"])
    evaluate.write_reports(evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["energy"], limit=40), out)
    real = evaluate.write_text_atomic

    def killed_after_the_csv(path, text):
        real(path, text)
        if path.endswith("results.csv"):
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "write_text_atomic", killed_after_the_csv)
    with pytest.raises(KeyboardInterrupt):  # a rerun with another detector, killed between the reports
        evaluate.write_reports(evaluate.evaluate(model, sets["id"], {"noise": sets["noise"]}, ["msp"], limit=40), out)
    assert "msp" in open(os.path.join(out, "results.csv")).read()
    assert not os.path.exists(os.path.join(out, "results.json"))  # the old, energy-only json is not left
