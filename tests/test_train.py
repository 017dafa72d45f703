"""kood.trainer / kood.run / kood.train: methods learn, runs resume exactly, logs hold the tags."""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr

import keras
import numpy as np
import pytest
import tensorflow as tf

from kood import losses, sampling
from kood import run as run_lib
from kood.errors import ConfigError, DataError
from kood.methods import METHODS, method_config
from kood.models import build_classifier
from kood.trainer import OODTrainer
from kood.writer import write_arrays
from tests.train_helpers import digits_arrays, make_digit_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory):
    return make_digit_sets(str(tmp_path_factory.mktemp("digits")))


def _classifier(num_classes=5):
    return build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=num_classes, mean=[60.0], std=[80.0])


def _config(dirs, model_dir, **kw):
    base = dict(model_dir=model_dir, id_data=dirs["id"], aux_data=dirs["aux"], ood_data={"ood": dirs["ood"]},
                method="greg", epochs=2, steps_per_epoch=3, batch_size=16, lr=0.05, verbose=0)
    base.update(kw)
    return run_lib.RunConfig(**base)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_lowers_its_loss(method):
    x, y = digits_arrays([0, 1, 2, 3, 4])
    xa, _ = digits_arrays([5, 6, 7])
    b = 16
    x_id, y_id = tf.constant(x[:b], tf.float32), tf.constant(y[:b])
    trainer = OODTrainer(_classifier(), method_config(method, cluster_k=4, pool_factor=3))
    pool = tf.constant(xa[:trainer.aux_batch_size(b)], tf.float32)
    trainer.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9))
    fixed_aux = pool[:2 * b] if trainer.config.sampler == "energy_cluster" else pool
    before = float(trainer.compute_losses(x_id, y_id, fixed_aux, training=False)["loss"])
    batch = ((x_id, y_id), pool) if trainer.config.uses_aux else (x_id, y_id)
    trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=25, epochs=1, verbose=0, shuffle=False)
    after = float(trainer.compute_losses(x_id, y_id, fixed_aux, training=False)["loss"])
    assert np.isfinite(after)
    assert after < 0.8 * before, (method, before, after)


def test_greg_plus_step_selects_twice_the_batch_from_the_pool():
    xa, _ = digits_arrays([5, 6, 7])
    trainer = OODTrainer(_classifier(), method_config("greg_plus", cluster_k=8, pool_factor=4))
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    pool = tf.constant(xa[:64], tf.float32)
    idx = trainer.select_outliers(pool, 16).numpy()
    assert idx.shape == (32,) and len(set(idx.tolist())) == 32 and idx.min() >= 0 and idx.max() < 64
    # The picks are the sampler's on the pool's inference-mode features and energies, seeded by (seed, step).
    out = trainer.net(trainer.normalize(pool), training=False)
    expected = sampling.energy_cluster_sample(out["features"], losses.energy_score(out["logits"]), num_select=32,
                                              num_clusters=8, two_way=True, seed=tf.constant([0, 0], tf.int64))
    np.testing.assert_array_equal(idx, expected.numpy())


def test_a_step_reports_only_the_loss_terms_its_method_has():
    x, y = digits_arrays([0, 1, 2, 3, 4])
    xa, _ = digits_arrays([5, 6, 7])
    batch = (tf.constant(x[:8], tf.float32), tf.constant(y[:8]))
    terms = {"energy_loss", "oe_loss", "grad_penalty"}
    for method, has in (("ce", set()), ("oe", {"oe_loss"}), ("energy", {"energy_loss"}), ("oe_grad", {"oe_loss",
                        "grad_penalty"}), ("greg", {"energy_loss", "grad_penalty"})):
        trainer = OODTrainer(_classifier(), method_config(method))
        trainer.compile(optimizer=keras.optimizers.SGD(0.01))
        logs = trainer.train_step(batch if method == "ce" else (batch, tf.constant(xa[:8], tf.float32)))
        assert terms & set(logs) == has and {"loss", "ce_loss", "accuracy"} <= set(logs), (method, sorted(logs))
        # Mask fractions only of the masks the method uses.
        assert ("energy_active_id" in logs) == ("energy_loss" in has), (method, sorted(logs))
        assert ("grad_keep_id" in logs) == ("grad_penalty" in has), (method, sorted(logs))


def test_the_trainer_refuses_data_its_method_cannot_use_and_says_what_to_save(tmp_path):
    x, y = digits_arrays([0, 1, 2, 3, 4])
    batch = (tf.constant(x[:8], tf.float32), tf.constant(y[:8]))
    greg = OODTrainer(_classifier(), method_config("greg"))
    greg.compile(optimizer=keras.optimizers.SGD(0.01))
    with pytest.raises(ConfigError, match=r"trains on auxiliary outliers, but the data gives \(x_id, y_id\) batches"):
        greg.train_step(batch)
    greg_plus = OODTrainer(_classifier(), method_config("greg_plus"))
    with pytest.raises(ConfigError, match=r"pool_factor x B = 48, as kood.train gives it. Received: 8 auxiliary images for B = 8"):
        greg_plus.select_outliers(batch[0], 8)
    xa, _ = digits_arrays([5, 6, 7])
    unpadded = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices((x[:20].astype("float32"), y[:20])).batch(8),
                                    tf.data.Dataset.from_tensor_slices(xa[:120].astype("float32")).batch(48)))
    greg_plus.compile(optimizer=keras.optimizers.SGD(0.01))
    with pytest.raises(ConfigError, match="GReg\\+ sampling needs batches of a fixed size: .*drop_remainder=True"):
        greg_plus.fit(unpadded, epochs=1, verbose=0, shuffle=False)


def test_greg_plus_pool_forward_in_bfloat16_selects_like_float32_and_trains():
    """--pool_dtype=bfloat16: the candidate forward's convolutions run in bfloat16, most picks are the
    float32 ones, the layers get their float32 policies back, and training steps keep float32 weights."""
    x, y = digits_arrays([0, 1, 2, 3, 4])
    xa, _ = digits_arrays([5, 6, 7])
    b = 16
    pool = tf.constant(xa[:3 * b], tf.float32)
    classifier = _classifier()
    picks, graphs = {}, {}
    for dtype in ("float32", "bfloat16"):
        trainer = OODTrainer(classifier, method_config("greg_plus", cluster_k=4, pool_factor=3, pool_dtype=dtype))
        trainer.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9))
        trainer.optimizer.build(classifier.trainable_variables)
        select = tf.function(lambda p, t=trainer: t.select_outliers(p, b))
        picks[dtype] = set(select(pool).numpy().tolist())
        graphs[dtype] = select.get_concrete_function(pool).graph
    conv_dtypes = {dtype: {op.get_attr("T") for op in g.get_operations() if op.type == "Conv2D"}
                   for dtype, g in graphs.items()}
    assert conv_dtypes == {"float32": {tf.float32}, "bfloat16": {tf.bfloat16}}
    assert len(picks["bfloat16"] & picks["float32"]) >= 0.75 * 2 * b
    assert all(layer.dtype_policy.name == "float32" for layer in classifier.layers)  # restored
    trainer.fit(tf.data.Dataset.from_tensors(((tf.constant(x[:b], tf.float32), tf.constant(y[:b])), pool)).repeat(),
                steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    assert classifier.get_layer("classifier").kernel.dtype == "float32"
    assert all(np.isfinite(v.numpy()).all() for v in classifier.weights)


def test_mixed_bfloat16_greg_plus_matches_float32_and_trains():
    """--precision=mixed_bfloat16: the loss terms (GReg penalty included) match the float32 model with the
    same weights to bfloat16 rounding; the pool forward follows --pool_dtype (float32 by default: the
    float32 model's exact picks); training keeps float32 weights and lowers the loss."""
    x, y = digits_arrays([0, 1, 2, 3, 4])
    xa, _ = digits_arrays([5, 6, 7])
    b = 16
    x_id, y_id = tf.constant(x[:b], tf.float32), tf.constant(y[:b])
    pool = tf.constant(xa[:3 * b], tf.float32)
    reference = _classifier()
    mixed = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=5, mean=[60.0], std=[80.0],
                             precision="mixed_bfloat16")
    mixed.set_weights(reference.get_weights())
    trainers = {}
    for name, model in (("float32", reference), ("mixed", mixed)):
        trainers[name] = OODTrainer(model, method_config("greg_plus", cluster_k=4, pool_factor=3))
        trainers[name].compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.9))
        trainers[name].optimizer.build(model.trainable_variables)
    picks = {name: t.select_outliers(pool, b).numpy() for name, t in trainers.items()}
    np.testing.assert_array_equal(picks["mixed"], picks["float32"])
    aux = tf.gather(pool, picks["float32"])
    terms = {name: t.compute_losses(x_id, y_id, aux, training=True) for name, t in trainers.items()}
    for key in ("ce_loss", "energy_loss", "grad_penalty", "loss"):
        expected = float(terms["float32"][key])
        assert expected > 0 and abs(float(terms["mixed"][key]) - expected) < 0.05 * expected, key
    bf16 = OODTrainer(mixed, method_config("greg_plus", cluster_k=4, pool_factor=3, pool_dtype="bfloat16"))
    bf16.compile(optimizer=keras.optimizers.SGD(0.02))
    bf16.optimizer.build(mixed.trainable_variables)
    assert len(set(bf16.select_outliers(pool, b).numpy().tolist()) & set(picks["float32"].tolist())) >= 0.75 * 2 * b
    trainer = trainers["mixed"]
    before = float(trainer.compute_losses(x_id, y_id, aux, training=False)["loss"])
    trainer.fit(tf.data.Dataset.from_tensors(((x_id, y_id), pool)).repeat(), steps_per_epoch=25, epochs=1, verbose=0,
                shuffle=False)
    after = float(trainer.compute_losses(x_id, y_id, aux, training=False)["loss"])
    assert after < 0.8 * before, (before, after)
    assert all(v.dtype == "float32" and np.isfinite(v.numpy()).all() for v in mixed.weights)


def _event_tags(log_dir: str) -> set[str]:
    tags = set()
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def test_run_trains_evaluates_and_logs_the_named_tags(digit_sets, tmp_path):
    model_dir = str(tmp_path / "run")
    results = run_lib.run_training(_config(digit_sets, model_dir, method="greg_plus",
                                           method_overrides={"cluster_k": 8, "pool_factor": 3}))
    ood = results["ood"]["ood"]
    assert 0.0 <= ood["fpr95"] <= 1.0 and 0.0 <= ood["auroc"] <= 1.0
    assert ood["split"] == "test" and ood["count"] == run_lib.read_manifest(digit_sets["ood"]).count("test")
    for name in ("best.keras", "last.keras", "config.json", "results.json", "ckpt/latest"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    tags = _event_tags(os.path.join(model_dir, "logs"))
    expected = {"loss", "ce_loss", "energy_loss", "grad_penalty", "accuracy", "energy_id", "energy_aux",
                "grad_keep_id", "grad_keep_aux", "lr", "energy/id", "energy/aux", "score_grad_norm",
                "sampler/chosen_outliers", "_hparams_/session_start_info"}
    assert expected <= tags, expected - tags
    hparams = _logged_hparams(os.path.join(model_dir, "logs"))
    assert hparams["method"] == "greg_plus" and hparams["precision"] == "float32"
    assert hparams["cluster_k"] == 8 and hparams["grad_weight"] == 1.0


def _logged_hparams(log_dir: str) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    return {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
    raise AssertionError(f"no hparams under {log_dir}")


def test_mixed_bfloat16_run_saves_evaluates_and_exports(digit_sets, tmp_path):
    from kood.export import export_detector
    from kood.models import load_classifier, model_precision

    model_dir = str(tmp_path / "run")
    results = run_lib.run_training(_config(digit_sets, model_dir, precision="mixed_bfloat16", epochs=1))
    assert np.isfinite(results["ood"]["ood"]["auroc"])
    model = load_classifier(model_dir)
    assert model_precision(model) == "mixed_bfloat16"
    export_detector(model_dir, str(tmp_path / "export"))
    images = digits_arrays([0, 1, 2, 3, 4])[0][:32]
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"](images=tf.constant(images))
    assert served["logits"].dtype == tf.float32
    np.testing.assert_allclose(served["logits"].numpy(), model(images.astype("float32")).numpy(), rtol=1e-5, atol=1e-5)


def test_finished_run_is_not_retrained(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1)
    run_lib.run_training(cfg)
    mtime = os.path.getmtime(os.path.join(cfg.model_dir, "last.keras"))
    run_lib.run_training(cfg)
    assert os.path.getmtime(os.path.join(cfg.model_dir, "last.keras")) == mtime


@pytest.mark.parametrize("change, message", [
    (dict(sio_ratio=0.8), "--syn_data"),
    (dict(sio_ratio=1.5, syn_data="x"), "--sio_ratio"),
    (dict(aux_data=None), "--aux_data"),
    (dict(arch="resnet9000"), "--arch"),
    (dict(precision="mixed_float16"), "--precision"),
    (dict(method="nope"), "--method"),
    (dict(method_overrides={"m_in": -5.0, "m_out": -7.0}), "--m_in"),
    (dict(schedule="multistep"), "--lr_milestones"),
    (dict(method_overrides={"pool_dtype": "bfloat16"}), "--pool_dtype"),  # greg has no candidate pool
    (dict(method="greg_plus", method_overrides={"pool_dtype": "int8"}), "--pool_dtype"),
    (dict(schedule="multistep", lr_milestones=(2, 1), epochs=3), "--lr_milestones"),  # not increasing
    (dict(schedule="multistep", lr_milestones=(3,), epochs=3), "--lr_milestones"),  # would never apply
    (dict(lr_milestones=(1,)), "--lr_milestones"),  # cosine has no milestones
    (dict(min_lr=0.5), "--min_lr"),  # above --lr=0.05: the cosine schedule would climb
    (dict(schedule="constant", min_lr=0.01), "--min_lr"),
    (dict(method_overrides={"m_in": float("nan")}), "--m_in"),
    (dict(method="greg_plus", method_overrides={"aux_batch_factor": 2.0}), "--aux_batch_factor"),
    (dict(method="ce", method_overrides={"sampler": "energy_cluster"}), "--sampler"),
    (dict(method="ce", method_overrides={"aux_batch_factor": 2.0}), "--aux_batch_factor"),
    (dict(lr=float("nan")), "--lr must"),
    (dict(lr=float("inf")), "--lr must"),
    (dict(momentum=1.5), "--momentum"),
    (dict(weight_decay=-1.0), "--weight_decay"),
    (dict(schedule="multistep", lr_milestones=(1,), lr_gamma=0.0), "--lr_gamma"),
    (dict(steps_per_epoch=-1), "--steps_per_epoch"),
    (dict(batch_size=4, sio_ratio=0.1, syn_data="x"), "leaves no real image"),
    (dict(init_checkpoint="/nonexistent/ce.keras"), "--init_checkpoint=/nonexistent/ce.keras does not exist"),
])
def test_invalid_combinations_stop_before_any_work(digit_sets, tmp_path, change, message):
    cfg = _config(digit_sets, str(tmp_path / "run"), **change)
    with pytest.raises((ConfigError, DataError), match=message.replace("-", r"\-")):
        run_lib.run_training(cfg)
    assert not os.path.exists(cfg.model_dir)


def test_multistep_lr_drops_at_the_first_step_of_the_milestone_epoch(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), schedule="multistep", lr_milestones=(1,), lr=0.1, lr_gamma=0.1,
                  momentum=0.0, nesterov=False, weight_decay=0.0)
    optimizer = run_lib.make_optimizer(cfg, steps_per_epoch=4)
    w = keras.Variable(0.0)
    used = []
    for _ in range(6):  # gradient 1: each update moves w by the lr it used
        before = float(w.numpy())
        optimizer.apply([tf.constant(1.0)], [w])
        used.append(round(before - float(w.numpy()), 6))
    assert used == [0.1] * 4 + [0.01] * 2  # epoch 1 = updates 1-4; epoch 2 starts at the lower lr


def test_milestones_must_be_whole_epochs_and_sgd_flags_with_adam_get_a_note(capsys):
    from absl import flags

    from kood import train

    try:
        flags.FLAGS(["kood.train", "--id_data=x", "--lr_milestones=1.5"])
        with pytest.raises(ConfigError, match="--lr_milestones: epochs must be whole numbers"):
            train.config_from_flags()
        flags.FLAGS.unparse_flags()
        # e.g. a flagfile's --momentum under a later --optimizer=adam: noted, not an error
        flags.FLAGS(["kood.train", "--id_data=x", "--momentum=0.5", "--optimizer=adam"])
        assert train.config_from_flags().optimizer == "adam"
        assert "note: --momentum applies to --optimizer=sgd only" in capsys.readouterr().err
    finally:
        flags.FLAGS.unparse_flags()


def test_arch_help_lists_the_registry(monkeypatch):
    # the help was a hand-written list: an architecture added to ARCHITECTURES did not appear in --help
    from absl import flags

    from kood import models, train

    assert all(name in flags.FLAGS["arch"].help for name in models.ARCHITECTURES)
    monkeypatch.setitem(models.ARCHITECTURES, "my_net", lambda x, num_classes: x)
    assert "my_net" in train.arch_help()


def test_a_bad_flag_is_reported_before_the_demo_data_is_built(tmp_path):
    from absl import flags

    from kood import train

    root = str(tmp_path / "demo")
    try:
        flags.FLAGS(["kood.train", f"--demo_dir={root}", "--m_in=nan"])
        with pytest.raises(ConfigError, match="--m_in"):
            train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert not os.path.exists(root)


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                    out.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return out


def test_step_scalars_are_each_steps_value_and_validation_is_logged(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=2, log_every=1)
    run_lib.run_training(cfg)
    steps = _scalars(os.path.join(cfg.model_dir, "logs", "train"))
    epochs = _scalars(os.path.join(cfg.model_dir, "logs", "epoch"))
    for tag in ("loss", "ce_loss", "accuracy"):
        assert [s for s, _ in steps[tag]] == [1, 2, 3, 4, 5, 6]
        for epoch in (1, 2):  # the epoch scalar is the mean of its steps' own values
            own = [v for s, v in steps[tag] if 3 * (epoch - 1) < s <= 3 * epoch]
            assert np.mean(own) == pytest.approx(dict(epochs[tag])[epoch], rel=1e-4, abs=1e-5)
    assert len({round(v, 4) for _, v in steps["loss"][:3]}) == 3  # not running means (those would still differ)
    assert steps["lr"][0][1] == pytest.approx(0.05)  # step 1 ran at the initial lr
    assert [s for s, _ in epochs["test/accuracy"]] == [1, 2] and "test/ce" in epochs
    state = json.load(open(os.path.join(cfg.model_dir, "ckpt", "epoch-00002", "state.json")))
    assert dict(epochs["test/accuracy"])[2] == pytest.approx(state["history"][-1]["val_accuracy"])


def test_drop_events_after_keeps_earlier_steps_only(tmp_path):
    from kood.summaries import drop_events_after

    log_dir = str(tmp_path / "logs")
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for step in range(1, 11):
            tf.summary.scalar("loss", float(step), step=step)
    writer.close()
    assert drop_events_after(log_dir, 6) == {"loss"}
    assert [s for s, _ in _scalars(log_dir)["loss"]] == [1, 2, 3, 4, 5, 6]
    assert not [n for n in os.listdir(log_dir) if n.startswith(".")]  # no temp file left


def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1, log_every=1)
    killed = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "logs", "train"))  # what the killed run left
    with killed.as_default():
        for step in (1, 2):
            tf.summary.scalar("loss", 99.0, step=step)
    killed.close()
    old_hparams = os.path.join(cfg.model_dir, "logs", "epoch")
    writer = tf.summary.create_file_writer(old_hparams)  # the killed run had other settings (no checkpoint)
    with writer.as_default():
        from tensorboard.plugins.hparams import api as hp

        hp.hparams({"lr": 0.5})
    writer.close()
    with open(glob.glob(os.path.join(cfg.model_dir, "logs", "train", "events.out.tfevents.*"))[0], "ab") as f:
        f.write(b"\x07\x00\x00")  # a record cut short by the kill
    run_lib.run_training(cfg)
    points = _scalars(os.path.join(cfg.model_dir, "logs", "train"))["loss"]
    assert [s for s, _ in points] == [1, 2, 3] and 99.0 not in [v for _, v in points]
    assert _logged_hparams(os.path.join(cfg.model_dir, "logs"))["lr"] == cfg.lr  # the rerun's, not the killed one's
    hparams = [v for path in glob.glob(os.path.join(cfg.model_dir, "logs", "epoch", "events.out.tfevents.*"))
               for event in tf.compat.v1.train.summary_iterator(path) for v in event.summary.value
               if v.tag == "_hparams_/session_start_info"]
    assert len(hparams) == 1


def test_a_run_resumes_from_another_working_directory(digit_sets, tmp_path, monkeypatch):
    data = tmp_path / "data"
    os.symlink(os.path.dirname(digit_sets["id"]), data)
    monkeypatch.chdir(tmp_path)
    cfg = _config(digit_sets, "run", method="energy", epochs=1, id_data=os.path.join("data", "id"))
    run_lib.run_training(cfg)
    saved = json.load(open(os.path.join(tmp_path, "run", "config.json")))
    assert saved["id_data"] == str(tmp_path / "data" / "id")  # absolute: evaluate/export work from anywhere
    monkeypatch.chdir(tmp_path / "run")
    run_lib.run_training(dataclasses.replace(cfg, model_dir=".", id_data=os.path.join("..", "data", "id/")))


def test_resumed_run_must_keep_its_settings(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1)
    run_lib.run_training(cfg)
    run_lib.run_training(dataclasses.replace(cfg, id_data=cfg.id_data + "/"))  # the same dir, spelled otherwise
    changed = dataclasses.replace(cfg, lr=0.5, arch_kwargs={"width": 8}, method_overrides={"energy_weight": 0.2})
    with pytest.raises(ConfigError, match="or rerun with --arch_kwargs= --lr=0.05 and without --energy_weight to "
                                          "resume this one"):
        run_lib.run_training(changed)
    # A method flag given with its preset's value is the same run; with another value, only "without" is left.
    run_lib.run_training(dataclasses.replace(cfg, method_overrides={"energy_weight": 0.1, "m_in": -25.0}))
    with pytest.raises(ConfigError, match="or rerun without --energy_weight to resume"):
        run_lib.run_training(dataclasses.replace(cfg, method_overrides={"energy_weight": 0.2}))


def test_an_ood_set_that_is_the_auxiliary_set_is_named(digit_sets, tmp_path, capsys):
    cfg = _config(digit_sets, str(tmp_path / "run"), ood_data={"aux": digit_sets["aux"]},
                  init_checkpoint=str(tmp_path / "missing.keras"))  # stops right after the data checks
    with pytest.raises(DataError, match="does not exist"):
        run_lib.run_training(cfg)
    assert f"warning: --ood_data=aux={digit_sets['aux']} is the auxiliary training set" in capsys.readouterr().err


def test_a_resume_on_a_reconverted_data_set_is_refused_and_on_a_copy_continues(digit_sets, tmp_path):
    import shutil

    id_data, copy = str(tmp_path / "id"), str(tmp_path / "copy")
    shutil.copytree(digit_sets["id"], id_data)
    shutil.copytree(digit_sets["id"], copy)
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1, id_data=id_data)
    run_lib.run_training(cfg)
    run_lib.run_training(cfg)  # the same records: resumes (here: already finished)
    x, y = digits_arrays([0, 1, 2, 3, 4])
    shutil.rmtree(id_data)
    write_arrays(id_data, {"train": (x[:500], y[:500]), "test": (x[600:], y[600:])}, num_classes=5)
    with pytest.raises(DataError, match=r"--id_data=.* holds other records than when the run .* started"):
        run_lib.run_training(cfg)
    # The same records at another path (a moved set) continue the run there; evaluate/export follow.
    run_lib.run_training(dataclasses.replace(cfg, id_data=copy))
    assert json.load(open(os.path.join(cfg.model_dir, "config.json")))["id_data"] == copy
    with pytest.raises(ConfigError, match="rerun with --id_data="):  # other records at another path: a new setting
        run_lib.run_training(dataclasses.replace(cfg, id_data=digit_sets["syn"], ood_data={}))


def test_run_stopped_before_its_first_checkpoint_takes_corrected_settings(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1, arch_kwargs={"widht": 8})
    with pytest.raises(ConfigError, match="widht"):
        run_lib.run_training(cfg)
    assert os.path.exists(os.path.join(cfg.model_dir, "config.json"))  # written, but nothing trained under it
    cfg.arch_kwargs = {"width": 8}
    run_lib.run_training(cfg)
    assert json.load(open(os.path.join(cfg.model_dir, "config.json")))["arch_kwargs"] == {"width": 8}


def test_data_problems_stop_before_any_work(digit_sets, tmp_path):
    from kood.writer import write_arrays

    big = str(tmp_path / "big")
    write_arrays(big, {"test": (np.zeros((4, 16, 16, 1), np.uint8), -np.ones(4, np.int64))}, kind="ood", num_classes=0)
    cfg = _config(digit_sets, str(tmp_path / "run"), ood_data={"big": big})
    with pytest.raises(DataError, match=r"--ood_data=big=.* holds \(16, 16, 1\) images.*same size \(data_prep "
                                        r"--image_size\) or evaluate"):
        run_lib.run_training(cfg)
    rgb = str(tmp_path / "rgb")
    write_arrays(rgb, {"train": (np.zeros((4, 8, 8, 3), np.uint8), -np.ones(4, np.int64))}, kind="outlier",
                 num_classes=0)
    with pytest.raises(DataError, match=r"--aux_data=.*rgb holds \(8, 8, 3\) images.*same channels \(data_prep "
                                        r"--channels\)$"):
        run_lib.run_training(_config(digit_sets, str(tmp_path / "run"), aux_data=rgb))
    with pytest.raises(DataError, match=r"--aux_data=.*big: no split 'train'; it has \['test'\]"):
        run_lib.run_training(_config(digit_sets, str(tmp_path / "run"), aux_data=big))
    train_only = str(tmp_path / "train_only")
    x, y = digits_arrays([0, 1])
    write_arrays(train_only, {"train": (x, y)}, num_classes=2)
    cfg = _config(digit_sets, str(tmp_path / "run"), id_data=train_only)
    with pytest.raises(DataError, match=r"has only the splits \['train'\]"):
        run_lib.run_training(cfg)
    assert not os.path.exists(cfg.model_dir)
    with pytest.raises(DataError, match=r"--aux_data=\S*nope: dataset directory does not exist"):
        run_lib.run_training(_config(digit_sets, str(tmp_path / "run"), aux_data=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="--aux_data is the ID set itself"):
        run_lib.run_training(_config(digit_sets, str(tmp_path / "run"), aux_data=digit_sets["id"]))
    assert not os.path.exists(cfg.model_dir)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="--model_dir=.*a_file is a file, not a directory"):
        run_lib.run_training(_config(digit_sets, str(a_file), method="energy"))


def test_key_value_flags_are_parsed_once_for_every_cli():
    from kood.errors import parse_key_values

    assert parse_key_values(["a=x", "b=1"], "ood_data", typed=False) == {"a": "x", "b": "1"}
    assert parse_key_values("width=8,name=x,drop=0.5,flag=TRUE", "arch_kwargs") == {
        "width": 8, "name": "x", "drop": 0.5, "flag": True}
    with pytest.raises(ConfigError, match="--ood_data names 'a' twice"):
        parse_key_values(["a=x", "a=y"], "ood_data")
    with pytest.raises(ConfigError, match="--arch_kwargs: expected key=value items. Received: 'width'"):
        parse_key_values("width", "arch_kwargs")


def test_setting_added_after_a_run_started_resumes_at_its_default(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=2)
    run_lib.run_training(dataclasses.replace(cfg, epochs=1))
    path = os.path.join(cfg.model_dir, "config.json")
    saved = json.load(open(path))
    saved["epochs"] = 2  # the longer run is the one resumed below
    del saved["precision"]  # as written by a kood without the setting
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(ConfigError, match="'precision': \\('float32', 'mixed_bfloat16'\\)"):
        run_lib.run_training(dataclasses.replace(cfg, precision="mixed_bfloat16"))
    run_lib.run_training(cfg)
    assert open(os.path.join(cfg.model_dir, "ckpt", "latest")).read().strip() == "epoch-00002"


def test_corrupt_run_config_is_named_and_left_alone(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1)
    os.makedirs(cfg.model_dir)
    path = os.path.join(cfg.model_dir, "config.json")
    with open(path, "w") as f:
        f.write('{"method": "ener')  # truncated
    with pytest.raises(DataError, match=f"{path}: unreadable run config"):
        run_lib.run_training(cfg)
    assert open(path).read() == '{"method": "ener'
    assert not os.path.exists(os.path.join(cfg.model_dir, "ckpt"))


def test_init_checkpoint_must_match_the_architecture(digit_sets, tmp_path):
    other = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=7, mean=[60.0], std=[80.0])
    path = str(tmp_path / "other.keras")
    other.save(path)
    with pytest.raises(ConfigError, match="init_checkpoint"):
        run_lib.run_training(_config(digit_sets, str(tmp_path / "run"), init_checkpoint=path))


def test_init_checkpoint_loads_every_weight(digit_sets, tmp_path):
    source = _classifier()
    path = str(tmp_path / "ce.keras")
    source.save(path)
    cfg = _config(digit_sets, str(tmp_path / "run"), init_checkpoint=path)
    manifest = run_lib.read_manifest(cfg.id_data)
    model = run_lib._build_classifier(cfg, manifest)
    for a, b in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert f"starting from {path}; run dir" in run_lib._describe(cfg, run_lib.validate(cfg), manifest, 3, 16, 0)


def test_init_checkpoint_may_be_a_run_dir_and_a_mismatch_names_the_run_s_architecture(digit_sets, tmp_path):
    ce = _config(digit_sets, str(tmp_path / "ce"), method="ce", epochs=1, arch_kwargs={"width": 4})
    run_lib.run_training(ce)
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1, init_checkpoint=ce.model_dir)
    with pytest.raises(ConfigError, match=r"--arch=small_cnn expects .* its run \(.*config.json\) used "
                                          r"--arch=small_cnn --arch_kwargs=width=4"):
        run_lib.run_training(cfg)
    cfg = dataclasses.replace(cfg, arch_kwargs={"width": 4})
    model = run_lib._build_classifier(cfg, run_lib.read_manifest(cfg.id_data))
    ce_weights = keras.models.load_model(os.path.join(ce.model_dir, "best.keras")).get_weights()
    for a, b in zip(model.get_weights(), ce_weights):
        np.testing.assert_array_equal(a, b)
    results = os.path.join(ce.model_dir, "results.json")
    os.rename(results, results + ".away")  # as if the CE job had been preempted: fine-tuning from it warns
    with redirect_stderr(io.StringIO()) as err:
        run_lib._build_classifier(cfg, run_lib.read_manifest(cfg.id_data))
    assert f"warning: {ce.model_dir}: the run has not finished" in err.getvalue()
    os.rename(results + ".away", results)
    run_lib.run_training(cfg)
    run_lib.run_training(dataclasses.replace(cfg, init_checkpoint=os.path.join(ce.model_dir, "best.keras")))  # same
    with pytest.raises(DataError, match="is a directory without best.keras"):
        run_lib.run_training(dataclasses.replace(cfg, init_checkpoint=str(tmp_path), model_dir=str(tmp_path / "r2")))


def test_a_run_with_a_checkpoint_no_longer_needs_its_init_checkpoint(digit_sets, tmp_path):
    path = str(tmp_path / "ce.keras")
    build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=5, mean=[60.0], std=[80.0]).save(path)
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1, init_checkpoint=path)
    first = run_lib.run_training(cfg)
    os.remove(path)  # e.g. a cleaned-up pretraining run: the checkpoint replaces those weights anyway
    assert run_lib.run_training(cfg)["ood"] == first["ood"]


def test_checkpoint_write_killed_before_its_rename_is_cleaned_up(tmp_path):
    from kood import checkpoint

    model = _classifier()
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    ckpt_dir = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(ckpt_dir, ".epoch-00002.u6gx5k2a"))  # what SIGKILL mid-write leaves
    checkpoint.save(ckpt_dir, model, optimizer, {"epoch": 2})
    assert sorted(os.listdir(ckpt_dir)) == ["epoch-00002", "latest"]


@pytest.mark.parametrize("file", ["model.weights.h5", "optimizer.npz", "state.json"])
def test_a_truncated_checkpoint_is_named_with_how_to_resume_from_the_one_before(tmp_path, file):
    from kood import checkpoint

    model = _classifier()
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    ckpt_dir = str(tmp_path / "ckpt")
    for epoch in (1, 2):
        checkpoint.save(ckpt_dir, model, optimizer, {"epoch": epoch})
    path = os.path.join(ckpt_dir, "epoch-00002", file)
    os.truncate(path, os.path.getsize(path) // 2)  # a copy cut short, a full disk
    with pytest.raises(DataError, match=f"epoch-00002/{file}: cannot read this checkpoint file .* the checkpoint is "
                                        f"damaged. To resume from epoch-00001, write that name into {ckpt_dir}/latest"):
        checkpoint.restore(checkpoint.latest(ckpt_dir), model, optimizer)
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:  # what the message says to do
        f.write("epoch-00001")
    assert checkpoint.restore(checkpoint.latest(ckpt_dir), model, optimizer) == {"epoch": 1}
    open(os.path.join(ckpt_dir, "latest"), "w").close()  # an empty pointer: the newest intact one is offered
    with pytest.raises(DataError, match="latest is empty: .*To resume from epoch-00002, write that name into"):
        checkpoint.latest(ckpt_dir)


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path, monkeypatch):
    from kood import checkpoint

    model = _classifier()
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    ckpt_dir = str(tmp_path / "ckpt")
    checkpoint.save(ckpt_dir, model, optimizer, {"epoch": 1})

    def full_disk(*args, **kwargs):
        raise RuntimeError("Can't write data (file write failed: errno = 28, No space left on device)")  # h5py's

    monkeypatch.setattr(model, "save_weights", full_disk)
    with pytest.raises(DataError, match="cannot write the checkpoint of epoch 2 .*No space left on device.*The "
                                        "previous checkpoint is intact"):
        checkpoint.save(ckpt_dir, model, optimizer, {"epoch": 2})
    assert sorted(os.listdir(ckpt_dir)) == ["epoch-00001", "latest"]
    usage = shutil.disk_usage(ckpt_dir)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))  # refused before writing
    with pytest.raises(DataError, match=r"0.0 MiB free, the checkpoint of epoch 3 needs about .* MiB"):
        checkpoint.save(ckpt_dir, model, optimizer, {"epoch": 3})
    assert sorted(os.listdir(ckpt_dir)) == ["epoch-00001", "latest"]


def test_a_process_killed_between_checkpoint_and_keras_files_gets_them_on_rerun(digit_sets, tmp_path):
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1)
    first = run_lib.run_training(cfg)
    weights = keras.models.load_model(os.path.join(cfg.model_dir, "best.keras")).get_weights()
    for name in ("best.keras", "last.keras", "results.json"):  # the checkpoint was written, then the kill
        os.remove(os.path.join(cfg.model_dir, name))
    again = run_lib.run_training(cfg)
    assert again["id_accuracy"] == first["id_accuracy"] and again["checkpoint_epoch"] == 1
    for name in ("best.keras", "last.keras"):
        for a, b in zip(keras.models.load_model(os.path.join(cfg.model_dir, name)).get_weights(), weights):
            np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(digit_sets, tmp_path, monkeypatch):
    original = OODTrainer.compute_losses

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        # Epoch 1 (steps 0-2) is healthy; the loss turns NaN in epoch 2.
        bad = self.optimizer.iterations >= 4
        terms["loss"] = tf.where(bad, float("nan"), terms["loss"])
        return terms

    monkeypatch.setattr(OODTrainer, "compute_losses", poisoned)
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=3)
    with pytest.raises(FloatingPointError, match="epoch 2.*epoch 1.*new --model_dir"):
        run_lib.run_training(cfg)
    latest = open(os.path.join(cfg.model_dir, "ckpt", "latest")).read().strip()
    assert latest == "epoch-00001"


def test_nan_in_the_first_epoch_leaves_the_run_dir_free_for_other_settings(digit_sets, tmp_path, monkeypatch):
    original = OODTrainer.compute_losses

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        terms["loss"] = terms["loss"] + float("nan")
        return terms

    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=1)
    with monkeypatch.context() as patch:
        patch.setattr(OODTrainer, "compute_losses", poisoned)
        with pytest.raises(FloatingPointError, match="No checkpoint was written yet"):
            run_lib.run_training(cfg)
    cfg.lr = 0.01
    assert run_lib.run_training(cfg)["checkpoint_epoch"] == 1


def _train_cmd(dirs, model_dir):
    return [sys.executable, "-m", "kood.train", f"--id_data={dirs['id']}", f"--aux_data={dirs['aux']}",
            "--method=greg", "--epochs=4", "--steps_per_epoch=6", "--batch_size=16", "--lr=0.05",
            "--deterministic", "--verbose=0", f"--model_dir={model_dir}"]


def _weights(model_dir):
    return keras.models.load_model(os.path.join(model_dir, "last.keras")).get_weights()


def test_resume_after_sigkill_ends_with_the_same_weights(digit_sets, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_train_cmd(digit_sets, straight), check=True, cwd=REPO, env=env, capture_output=True)

    proc = subprocess.Popen(_train_cmd(digit_sets, killed), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = os.path.join(killed, "ckpt", "latest")
    deadline = time.time() + 120
    while not os.path.exists(pointer) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = open(pointer).read().strip()
    assert done != "epoch-00004", "the run finished before it could be killed; make it longer"

    resumed = subprocess.run(_train_cmd(digit_sets, killed), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stderr
    for a, b in zip(_weights(straight), _weights(killed)):
        np.testing.assert_array_equal(a, b)
    for part in ("train", "epoch"):  # the killed process's points past the checkpoint were dropped
        for tag, points in _scalars(os.path.join(killed, "logs", part)).items():
            steps = [s for s, _ in points]
            assert len(steps) == len(set(steps)), (part, tag, steps)


def test_sigterm_stops_like_ctrl_c_with_a_resume_hint(digit_sets, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    model_dir = str(tmp_path / "run")
    proc = subprocess.Popen(_train_cmd(digit_sets, model_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(model_dir, "ckpt", "latest")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends to preempt a job
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, stderr[-2000:]
    assert f"kood.train: interrupted (SIGTERM): rerun the same command to resume from the last checkpoint in " \
           f"{model_dir}" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_every_flagfile_parses_into_a_valid_config():
    from absl import flags

    from kood import train

    files = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))
    assert len(files) >= 40
    cwd = os.getcwd()
    os.chdir(REPO)  # nested --flagfile paths are relative to the repo root
    try:
        for path in files:
            flags.FLAGS.unparse_flags()
            flags.FLAGS(["kood.train", f"--flagfile={path}"])
            if flags.FLAGS.id_data is None:  # demo presets: no data flags
                method_config(flags.FLAGS.method)
                continue
            cfg = train.config_from_flags()
            run_lib.validate(cfg)
            assert cfg.model_dir.startswith("kood_runs/"), path
    finally:
        os.chdir(cwd)
        flags.FLAGS.unparse_flags()


def test_progress_counts_the_whole_run_and_reports_validation(digit_sets, tmp_path, capsys):
    run_lib.run_training(_config(digit_sets, str(tmp_path / "run"), method="energy", epochs=3, verbose=2,
                                 sio_ratio=0.75, syn_data=digit_sets["syn"]))
    captured = capsys.readouterr()
    out = captured.out
    # The settings the method acts on: no oe_weight, sampler or gradient-space settings for energy.
    assert ("method energy: score_loss=energy, energy_weight=0.1, m_in=-25.0, m_out=-7.0, grad_weight=0.0, "
            "sampler=random, aux_batch_factor=1.0, temperature=1.0\n") in captured.err
    assert "small_cnn (float32) on 600 " in captured.err
    assert "3 steps/epoch x 3 epochs of 16 ID images (4 of them synthetic, 25%, from " in captured.err
    assert "+ 16 auxiliary" in captured.err
    assert [line for line in out.splitlines() if line.startswith("Epoch ")] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert len([line for line in out.splitlines() if line.startswith("epoch ") and ": test accuracy" in line]) == 3
    assert "epoch 1/3: test accuracy" in out and "best so far" not in out  # the test split never picks
    assert "note: best.keras is the last epoch" in captured.err


def test_final_metrics_are_those_of_best_keras(digit_sets, tmp_path, monkeypatch):
    from kood.methods import method_config as make_method_config
    from kood.models import load_classifier

    validate = run_lib._validate
    accuracies = iter([0.9, 0.5, 0.4])  # best.keras = epoch 1, not the last epoch

    def fake_validate(model, directory, split):
        return {**validate(model, directory, split), "val_accuracy": next(accuracies)}

    monkeypatch.setattr(run_lib, "_validate", fake_validate)
    # The digit sets have no val split: auto only monitors the test split, so best.keras is the last epoch.
    auto = run_lib.run_training(_config(digit_sets, str(tmp_path / "auto"), method="energy", epochs=3, lr=0.2))
    assert auto["checkpoint_epoch"] == 3
    accuracies = iter([0.9, 0.5, 0.4])
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=3, lr=0.2, val_split="test")
    results = run_lib.run_training(cfg)
    assert (results["checkpoint"], results["checkpoint_epoch"], results["epochs"]) == ("best.keras", 1, 3)
    manifest = run_lib.read_manifest(cfg.id_data)
    mcfg = make_method_config("energy")
    best = run_lib.final_evaluation(load_classifier(os.path.join(cfg.model_dir, "best.keras")), cfg, mcfg, manifest)
    last = run_lib.final_evaluation(load_classifier(os.path.join(cfg.model_dir, "last.keras")), cfg, mcfg, manifest)
    assert best["ood"]["ood"] != last["ood"]["ood"]  # the two checkpoints differ, so the test can tell them apart
    assert results["id_accuracy"] == best["id_accuracy"] and results["ood"] == best["ood"]
    assert json.load(open(os.path.join(cfg.model_dir, "results.json")))["checkpoint_epoch"] == 1


@pytest.mark.parametrize("damage", ["flipped_byte", "num_classes_edited"])
def test_damaged_data_file_is_named_without_a_traceback(digit_sets, tmp_path, damage):
    import shutil

    damaged = str(tmp_path / "id")
    shutil.copytree(digit_sets["id"], damaged)
    shard = sorted(glob.glob(os.path.join(damaged, "train-*.tfrecord")))[0]
    if damage == "flipped_byte":  # the record's CRC fails mid-epoch
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    else:  # a hand-edited manifest: labels 4 are out of range (kood.data's per-record assertion)
        manifest = json.load(open(os.path.join(damaged, "manifest.json")))
        manifest.update(num_classes=4, class_names=manifest["class_names"][:4])
        json.dump(manifest, open(os.path.join(damaged, "manifest.json"), "w"))
    cmd = [sys.executable, "-m", "kood.train", f"--id_data={damaged}", "--method=ce", "--epochs=1",
           "--batch_size=16", "--verbose=0", f"--model_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"kood.train: error: {shard}: " in proc.stderr and "data_prep.verify" in proc.stderr
    assert "Traceback" not in proc.stderr and "function_node" not in proc.stderr  # TF's words only, undecorated


def test_a_partial_demo_cache_is_rebuilt(tmp_path):
    import shutil

    from absl import flags

    from kood import train
    from kood.demo_data import build_demo

    root = str(tmp_path / "demo")
    build_demo(root)
    shutil.rmtree(os.path.join(root, "ood"))  # e.g. a user cleaned part of the cache
    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["kood.train", f"--demo_dir={root}", f"--model_dir={tmp_path / 'run'}"])
        cfg = train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert cfg.ood_data == {"demo_ood": os.path.join(root, "ood")}
    assert os.path.exists(os.path.join(root, "ood", "manifest.json"))
    assert cfg.augment is False  # digits: no flips by default
    try:
        flags.FLAGS(["kood.train", f"--demo_dir={root}", f"--model_dir={tmp_path / 'run'}", "--augment"])
        assert train.config_from_flags().augment is True  # a flag the user sets wins
    finally:
        flags.FLAGS.unparse_flags()


def test_a_diverged_epoch_is_never_checkpointed(digit_sets, tmp_path, monkeypatch):
    validate = run_lib._validate
    calls = iter(range(10))

    def nan_in_epoch_2(model, directory, split):
        record = validate(model, directory, split)
        return {**record, "val_ce": float("nan")} if next(calls) == 1 else record

    monkeypatch.setattr(run_lib, "_validate", nan_in_epoch_2)
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy", epochs=3)
    with pytest.raises(FloatingPointError, match="epoch 2: non-finite validation cross-entropy.*epoch 1"):
        run_lib.run_training(cfg)
    assert open(os.path.join(cfg.model_dir, "ckpt", "latest")).read().strip() == "epoch-00001"
    assert run_lib._diverged(_classifier(), {}) is None
    poisoned = _classifier()
    poisoned.weights[0].assign(np.full(poisoned.weights[0].shape, np.inf, np.float32))
    assert "non-finite weights" in run_lib._diverged(poisoned, {})


def test_final_results_print_in_percentages_like_evaluate_and_bench():
    results = {"id_split": "test", "id_accuracy": 0.99072, "score": "energy", "fpr_convention": "id",
               "ood": {"demo_ood": {"fpr95": 0.548, "auroc": 0.78071, "aupr_in": 0.5, "aupr_out": 0.91}}}
    text = run_lib.format_results(results)
    assert "ID accuracy (test split): 99.07%" in text
    assert "| demo_ood | 54.80 | 78.07 | 50.00 | 91.00 |" in text and "FPR95 % ↓" in text
    results["ood"]["demo_ood"]["split"] = "train"  # a set without a test split: the row says which was scored
    assert "| demo_ood (train split) | 54.80 |" in run_lib.format_results(results)


def test_fractional_pool_factor_and_the_papers_rule_in_the_header(digit_sets):
    trainer = OODTrainer(_classifier(), method_config("greg_plus", pool_factor=2.5))
    assert trainer.aux_batch_size(10) == 25
    with pytest.raises(ConfigError, match="pool_factor: must be a finite number"):
        method_config("greg_plus", pool_factor=float("nan"))
    cfg = _config(digit_sets, "run", method="greg_plus")
    manifest = run_lib.read_manifest(cfg.id_data)
    n_id = manifest.count("train")
    header = run_lib._describe(cfg, method_config("greg_plus"), manifest, 3, 96, 0, num_aux=3 * n_id)
    assert "+ 32 auxiliary chosen from 96 candidates (the paper's rule N_aux / N_id would be 3)" in header


def test_pool_factor_auto_is_the_papers_rule_from_the_sets(digit_sets, tmp_path, capsys):
    from absl import flags

    from kood import train
    from kood.methods import resolve_pool_factor

    assert resolve_pool_factor(method_config("greg_plus", pool_factor="auto"), 300_000, 50_000).pool_factor == 6.0
    assert resolve_pool_factor(method_config("greg_plus", pool_factor="auto"), 900, 1000).pool_factor == 2.0
    assert resolve_pool_factor(method_config("greg_plus", pool_factor=3), 900, 1000).pool_factor == 3
    with pytest.raises(ConfigError, match="--pool_factor: sizes the candidate pool of --sampler=energy_cluster"):
        method_config("greg", pool_factor="auto")
    with pytest.raises(ConfigError, match="give the trainer kood.methods.resolve_pool_factor"):
        OODTrainer(_classifier(), method_config("greg_plus", pool_factor="auto"))
    try:
        flags.FLAGS(["kood.train", "--id_data=x", "--method=greg_plus", "--pool_factor=2.5"])
        assert train.config_from_flags().method_overrides["pool_factor"] == 2.5
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["kood.train", "--id_data=x", "--method=greg_plus", "--pool_factor=half"])
        with pytest.raises(ConfigError, match="--pool_factor must be a number or auto. Received: pool_factor='half'"):
            train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    n_aux = run_lib.read_manifest(digit_sets["aux"]).count("train")
    n_id = run_lib.read_manifest(digit_sets["id"]).count("train")
    cfg = _config(digit_sets, str(tmp_path / "run"), method="greg_plus", epochs=1, steps_per_epoch=1, verbose=1,
                  ood_data={}, method_overrides={"cluster_k": 4, "pool_factor": "auto"})
    run_lib.run_training(cfg)
    pool = int(round(max(2.0, n_aux / n_id) * 16))
    assert (f"+ 32 auxiliary chosen from {pool} candidates (--pool_factor=auto: the paper's rule N_aux / N_id is "
            f"{n_aux / n_id:.3g}") in capsys.readouterr().err
    run_lib.run_training(cfg)  # a finished run's rerun: the same settings ("auto"), nothing to resume


def test_a_second_training_in_a_running_runs_model_dir_is_refused(digit_sets, tmp_path):
    from tests.data_helpers import held_elsewhere

    model_dir = tmp_path / "run"
    other = held_elsewhere(str(model_dir))  # a training (e.g. a requeued job's twin) still running there
    cfg = _config(digit_sets, str(model_dir), epochs=1, steps_per_epoch=1)
    with pytest.raises(DataError, match=f"{model_dir}: pid 4242 on elsewhere is training the run in this "
                                        r"--model_dir .*rerunning the same command then resumes the run"):
        run_lib.run_training(cfg)
    assert os.listdir(model_dir) == [".kood-writing.lock"]  # nothing of the refused run
    other.close()
    os.remove(model_dir / ".kood-writing.lock")
    run_lib.run_training(cfg)
    assert (model_dir / "results.json").exists() and not (model_dir / ".kood-writing.lock").exists()
    shutil.rmtree(model_dir)
    with pytest.raises(ConfigError):  # a run refused before any work leaves no empty --model_dir
        run_lib.run_training(_config(digit_sets, str(model_dir), lr_milestones=(1,)))
    assert not model_dir.exists()


def test_an_auxiliary_batch_larger_than_the_auxiliary_set_is_refused_before_any_work(digit_sets, tmp_path):
    n_aux = run_lib.read_manifest(digit_sets["aux"]).count("train")
    cfg = _config(digit_sets, str(tmp_path / "run"), method="greg_plus",
                  method_overrides={"cluster_k": 4, "pool_factor": 1e9})  # e.g. a typo: the batch would hang
    with pytest.raises(ConfigError, match=rf"The GReg\+ candidate pool \(--pool_factor x --batch_size\) is "
                                          rf"16000000000 images, more than the {n_aux} train images of --aux_data"):
        run_lib.run_training(cfg)
    cfg = _config(digit_sets, str(tmp_path / "run"), method="energy",
                  method_overrides={"aux_batch_factor": n_aux / 16 + 1})
    with pytest.raises(ConfigError, match=r"The auxiliary batch \(--aux_batch_factor x --batch_size\)"):
        run_lib.run_training(cfg)
    assert not (tmp_path / "run").exists()
