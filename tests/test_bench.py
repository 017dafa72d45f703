"""kood.bench: cell results match the scores, the table is the mean/std of the cells, reruns skip
finished cells, bad settings fail early, the budget plan scales epochs, --speed writes ratios."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kood import bench, checkpoint
from kood.errors import ConfigError, DataError
from kood.models import build_classifier
from tests.data_helpers import make_kood_dataset
from tests.train_helpers import make_digit_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dirs = make_digit_sets(str(root / "data"))
    # a fixed initial classifier: the fast tests skip pretraining (--init_checkpoint)
    model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=5, mean=[60.0], std=[80.0], width=4)
    dirs["init"] = str(root / "init.keras")
    model.save(dirs["init"])
    # another OOD set of the ID size, and a set of another size (10x10, used as aux and as OOD)
    dirs["ood2"] = make_kood_dataset(root / "data" / "ood2", num_classes=0, counts={"test": 60}, shape=(8, 8, 1),
                                     kind="ood", seed=3)
    dirs["big"] = make_kood_dataset(root / "data" / "big", num_classes=0, counts={"train": 40, "test": 40},
                                    shape=(10, 10, 1), kind="ood", seed=5)
    dirs["root"] = str(root)
    return dirs


def _cfg(sets, output, **kw):
    base = dict(id_data=sets["id"], aux_data=sets["aux"], syn_data=sets["syn"], ood={"d89": sets["ood"]},
                output=output, methods=["ce", "greg+sio"], seeds=2, init_checkpoint=sets["init"],
                arch_kwargs={"width": 4}, finetune_epochs=1, steps_per_epoch=2, batch_size=16, detectors=["msp"])
    base.update(kw)
    return bench.BenchConfig(**base)


@pytest.fixture(scope="module")
def report(sets):
    cfg = _cfg(sets, os.path.join(sets["root"], "out"))
    return cfg, bench.run_bench(cfg)


def test_cell_metrics_come_from_the_cells_scores(report):
    cfg, rep = report
    assert len(rep["cells"]) == 4  # 2 methods x 2 seeds
    for cell in rep["cells"]:
        with np.load(os.path.join(bench.cell_dir(cfg, cell["method"], cell["seed"]), "scores.npz")) as f:
            s_id, s_ood = f["energy/id"], f["energy/d89"]
        assert len(s_id) == 301 and len(s_ood) == 354
        # energy: higher = OOD; AUROC with OOD as the positive class, independently via sklearn
        expected = roc_auc_score(np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))], np.r_[s_id, s_ood])
        assert cell["ood"]["d89"]["auroc"] == pytest.approx(expected, abs=1e-9)
        threshold = np.sort(s_id)[int(np.ceil(0.95 * len(s_id))) - 1]
        assert cell["ood"]["d89"]["fpr95"] == pytest.approx(np.mean(s_ood <= threshold), abs=1e-9)
        assert cell["energy_stats"]["id_below_m_in"] == pytest.approx(np.mean(s_id < -25.0))
        assert 0.0 <= cell["id_accuracy"] <= 1.0
    ce = [c for c in rep["cells"] if c["method"] == "ce"]
    assert all(set(c["detectors"]) == {"msp"} for c in ce)
    trained = [c for c in rep["cells"] if c["method"] != "ce"]
    assert all(c["epochs"] == 1 and c["train_seconds"] > 0 for c in trained)
    assert all("energy_active_id" in c["train_log"] for c in trained)  # mask fractions from the run's log


def test_table_is_mean_and_std_of_the_seeds(report):
    cfg, rep = report
    on_disk = json.load(open(os.path.join(cfg.output, "results.json")))
    assert on_disk["summary"] == rep["summary"]
    for row, method in (("ce+energy-score", "ce"), ("greg+sio", "greg+sio")):
        values = [c["ood"]["d89"]["fpr95"] for c in rep["cells"] if c["method"] == method]
        stat = rep["summary"][row]["fpr95/d89"]
        assert stat["n"] == 2
        assert stat["mean"] == pytest.approx(np.mean(values))
        assert stat["std"] == pytest.approx(np.std(values, ddof=1))
    msp = [c["detectors"]["msp"]["ood"]["d89"]["auroc"] for c in rep["cells"] if c["method"] == "ce"]
    assert rep["summary"]["ce+msp"]["auroc/d89"]["mean"] == pytest.approx(np.mean(msp))
    table = open(os.path.join(cfg.output, "results.md")).read()
    stat = rep["summary"]["greg+sio"]["fpr95/d89"]
    assert f"| greg+sio | {stat['mean'] * 100:.2f} ± {stat['std'] * 100:.2f} |" in table
    assert "ID is positive" in table and "Machine:" in table
    e = [c["energy_stats"] for c in rep["cells"] if c["method"] == "greg+sio"]
    p50 = np.mean([x["id"]["p50"] for x in e])
    assert "| greg+sio | -25 / -7 | " in table and f" / {p50:.1f} / " in table  # the margin table
    for path in ("plots/energy_hist.png", "plots/roc.png"):
        assert open(os.path.join(cfg.output, path), "rb").read(4) == b"\x89PNG"


def test_summarize_on_made_up_cells():
    cells = [{"method": "greg", "id_accuracy": a, "train_seconds": 10.0 * a, "ood": {"x": {"fpr95": f, "auroc": 1 - f}},
              "average": {"fpr95": f, "auroc": 1 - f}} for a, f in ((0.9, 0.2), (0.8, 0.4), (0.7, 0.9))]
    s = bench.summarize(cells, ["x"])["greg"]
    assert s["fpr95/x"]["mean"] == pytest.approx(0.5)
    assert s["fpr95/x"]["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert s["id_accuracy"]["mean"] == pytest.approx(0.8)
    assert bench.mean_std([0.3]) == {"mean": 0.3, "std": 0.0, "n": 1}


def test_rerun_skips_finished_cells_and_redoes_a_missing_one(report, monkeypatch):
    cfg, rep = report
    result_files = [os.path.join(bench.cell_dir(cfg, c["method"], c["seed"]), bench.RESULT_FILE) for c in rep["cells"]]
    mtimes = {p: os.stat(p).st_mtime_ns for p in result_files}
    trained = []
    real = bench.run.run_training
    monkeypatch.setattr(bench.run, "run_training", lambda rc: trained.append(rc.model_dir) or real(rc))
    again = bench.run_bench(cfg)
    assert trained == []
    assert {p: os.stat(p).st_mtime_ns for p in result_files} == mtimes
    assert again["summary"] == rep["summary"]
    # a cell killed before its result file was written is run again (and only that one)
    gone = bench.cell_dir(cfg, "greg+sio", 1)
    os.remove(os.path.join(gone, bench.RESULT_FILE))
    bench.run_bench(cfg)
    assert trained == [gone]
    assert os.path.exists(os.path.join(gone, bench.RESULT_FILE))


class _Killed(Exception):
    pass


def test_train_seconds_of_a_resumed_cell_count_every_process(sets, tmp_path, monkeypatch):
    cfg = _cfg(sets, str(tmp_path / "out"), methods=["energy"], seeds=1, finetune_epochs=2, detectors=[])
    real_save = checkpoint.save

    def save_then_die(*args, **kwargs):  # a process killed right after its first epoch's checkpoint
        real_save(*args, **kwargs)
        raise _Killed()

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        bench.run_bench(cfg)
    monkeypatch.undo()
    ckpt = os.path.join(bench.cell_dir(cfg, "energy", 0), "ckpt")
    state_file = os.path.join(checkpoint.latest(ckpt), "state.json")
    state = json.load(open(state_file))
    assert [r["epoch"] for r in state["history"]] == [1]
    state["history"][0]["seconds"] = 1000.0  # the earlier process's epoch: far longer than this test runs
    open(state_file, "w").write(json.dumps(state))
    cell = bench.run_bench(cfg)["cells"][0]
    history = json.load(open(os.path.join(checkpoint.latest(ckpt), "state.json")))["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert cell["train_seconds"] == pytest.approx(1000.0 + history[1]["seconds"])
    row = next(line for line in open(os.path.join(cfg.output, "results.md")) if line.startswith("| energy |"))
    assert row.rstrip().endswith(f"| {cell['train_seconds']:.0f} |")


def test_rerun_with_other_settings_is_refused(report):
    cfg, _ = report
    changed = _cfg({"id": cfg.id_data, "aux": cfg.aux_data, "syn": cfg.syn_data, "ood": cfg.ood["d89"],
                    "init": cfg.init_checkpoint}, cfg.output, finetune_lr=0.5)
    before = _mtimes(cfg.output)
    with pytest.raises(ConfigError, match=r"runs/greg\+sio/seed-0, runs/greg\+sio/seed-1 with --finetune_lr=0.01 "
                                          r"\(now --finetune_lr=0.5\)\. Use a new --output"):
        bench.run_bench(changed)
    assert _mtimes(cfg.output) == before


def test_changed_settings_of_started_runs_are_refused_before_any_work(sets, tmp_path, monkeypatch, capsys):
    cfg = _cfg(sets, str(tmp_path / "out"), methods=["ce", "energy"], seeds=1, init_checkpoint=None,
               pretrain_epochs=1, detectors=[])
    bench.run_bench(cfg)
    monkeypatch.setattr(bench.run, "run_training", lambda rc: pytest.fail(f"trained {rc.model_dir}"))
    before = _mtimes(cfg.output)
    capsys.readouterr()
    changed = bench.BenchConfig(**{**vars(cfg), "lr": 0.5, "method_flags": {"energy": {"m_in": -9.0}}})
    with pytest.raises(ConfigError) as e:
        bench.run_bench(changed)
    message = str(e.value)
    assert "pretrain/seed-0 with --lr=0.1 (now --lr=0.5)" in message
    assert "runs/energy/seed-0 with no --method_flags for energy (now --method_flags=energy:m_in=-9.0)" in message
    assert "Use a new --output" in message and "model_dir" not in message
    assert "[1/" not in capsys.readouterr().err  # refused before the first cell started
    assert _mtimes(cfg.output) == before
    # A method flag with the preset's own value is the same training: the trained cell is skipped (run_training
    # fails this test if called), its result kept.
    result = os.path.join(bench.cell_dir(cfg, "energy", 0), bench.RESULT_FILE)
    bench.run_bench(bench.BenchConfig(**{**vars(cfg), "method_flags": {"*": {"m_in": -25.0}}}))
    assert os.stat(result).st_mtime_ns == before[result]


@pytest.mark.parametrize("change, error, match", [
    (dict(methods=["ce", "gerg"]), ConfigError, "unknown method 'gerg'"),
    (dict(methods=["energy", "energy"]), ConfigError, "twice"),
    (dict(seeds=0), ConfigError, "--seeds must be an integer >= 1. Received: seeds=0"),
    (dict(finetune_epochs=0), ConfigError, "finetune_epochs"),
    (dict(syn_data=None), ConfigError, "'greg\\+sio' trains with synthetic ID images: it needs --syn_data"),
    (dict(methods=["energy"]), ConfigError, "add ce to --methods"),
    (dict(methods=["ce", "energy"], aux_data=None), ConfigError, "needs --aux_data"),
    (dict(detectors=["nope"]), ConfigError, "Unknown detector"),
    (dict(budget_minutes=0), ConfigError, "budget_minutes"),
    (dict(ood={}), ConfigError, "--ood needs at least one"),
    (dict(method_flags={"greg_plus": {"m_in": -3.0}}), ConfigError, "not in --methods"),
    (dict(method_flags={"*": {"m_in": -3.0, "m_out": -5.0}}), ConfigError,
     r"with --method_flags \*:m_in=-3.0,m_out=-5.0 .*--m_in: must be below"),
    (dict(method_flags={"greg": {"margin": 1}}), ConfigError,
     r"--methods=greg\S* with --method_flags greg:margin=1 .*Unknown method hyperparameters"),
    # a GReg+ pool / aux batch larger than the aux set was found only when the cell started, after pretraining
    (dict(methods=["ce", "greg_plus"], init_checkpoint=None, batch_size=200), ConfigError,
     r"--methods=greg_plus: The GReg\+ candidate pool .* is 1200 images, more than the \d+ train images .*"
     r"--batch_size, or --method_flags=greg_plus:pool_factor="),
    (dict(methods=["ce", "energy"], init_checkpoint=None, method_flags={"energy": {"aux_batch_factor": 100.0}}),
     ConfigError, r"--methods=energy: The auxiliary batch .* is 1600 images.*--method_flags=energy:aux_batch_factor="),
    # a refused setting of another flag is not blamed on --method_flags
    (dict(sio_ratio=0.01, method_flags={"*": {"m_in": -20.0}}), ConfigError, r"^--batch_size=16 x --sio_ratio=0.01"),
])
def test_bad_settings_fail_before_any_work(sets, tmp_path, change, error, match):
    out = str(tmp_path / "out")
    with pytest.raises(error, match=match):
        bench.run_bench(_cfg(sets, out, **change))
    assert not os.path.exists(out)


@pytest.mark.parametrize("flag", ["id_data", "aux_data", "syn_data", "ood", "init_checkpoint"])
def test_missing_directories_are_named(sets, tmp_path, flag):
    missing = str(tmp_path / "missing")
    value = {"d89": missing} if flag == "ood" else missing
    with pytest.raises(DataError, match=f"--{flag}.*{missing}"):
        bench.run_bench(_cfg(sets, str(tmp_path / "out"), **{flag: value}))


def test_flag_parsers():
    assert bench.parse_method_flags("greg:grad_weight=0.1,m_in=-12;*:m_out=-5") == {
        "greg": {"grad_weight": 0.1, "m_in": -12}, "*": {"m_out": -5}}
    with pytest.raises(ConfigError, match="METHOD:key=value"):
        bench.parse_method_flags("grad_weight=0.1")
    cfg = bench.BenchConfig(id_data="i", aux_data="a", ood={}, output="o", methods=["greg", "greg+sio"],
                            method_flags={"*": {"m_in": -9.0}, "greg": {"grad_weight": 0.5},
                                          "greg+sio": {"grad_weight": 0.2}})
    assert bench.method_overrides(cfg, "greg") == {"m_in": -9.0, "grad_weight": 0.5}
    assert bench.method_overrides(cfg, "greg+sio") == {"m_in": -9.0, "grad_weight": 0.2}
    assert bench.split_method("greg_plus+sio") == ("greg_plus", True)


def test_budget_scales_epochs_down_never_up(sets, tmp_path, monkeypatch):
    step = {"ce": 0.01, "energy": 0.02, "greg+sio": 0.04}
    setup = {"ce": 2.0, "energy": 3.0, "greg+sio": 4.0}  # model build, compile, first traced steps
    fake = {"methods": {m: {"step_seconds": t, "pipeline_batches_per_second": 100.0, "setup_seconds": setup[m],
                            "pipeline_start_seconds": 0.5} for m, t in step.items()},
            "checkpoint_seconds": 0.25}
    monkeypatch.setattr(bench, "measure_speed", lambda cfg, methods, steps, reps, pipeline_batches: fake)
    started = bench.time.perf_counter() - 7.0  # the command's start: 7 s of imports and reading
    cfg = _cfg(sets, str(tmp_path / "o"), methods=["ce", "energy", "greg+sio"], init_checkpoint=None,
               pretrain_epochs=40, finetune_epochs=20, steps_per_epoch=50, budget_minutes=3.0)
    # an epoch = 50 steps x (step + 1/100 pipeline) + 0.5 s pipeline start + 0.25 s of checkpoint writes;
    # 2 seeds x (40 CE epochs + 20 epochs of each trained method)
    epoch = {m: 50 * (t + 0.01) + 0.75 for m, t in step.items()}
    train = 2 * (40 * epoch["ce"] + 20 * (epoch["energy"] + epoch["greg+sio"]))
    # measured overhead: the command so far, and per cell: a cell's evaluation = a CE setup + a forward pass (a
    # third of a CE step per batch of 16) over 301 ID test + 354 OOD + the auxiliary images; per seed:
    # pretraining's setup, 3 evaluated cells, 2 trained cells' setups
    aux = bench.read_manifest(sets["aux"]).count("train")
    evaluation = 2.0 + (301 + 354 + aux) / 16 * 0.01 / 3
    plan = bench.make_plan(cfg, started)
    assert 7.0 <= plan["planning_seconds"] < 8.0
    overhead = plan["planning_seconds"] + 2 * (2.0 + 3 * evaluation + 3.0 + 4.0)
    factor = (180.0 - overhead) / train
    assert plan["epoch_seconds"] == pytest.approx(epoch, abs=1e-3)
    assert plan["overhead_seconds"] == pytest.approx(overhead, abs=0.1)
    assert plan["estimate_seconds"] == pytest.approx(train + overhead, abs=0.1)
    assert plan["pretrain_epochs"] == {"requested": 40, "used": int(40 * factor)}
    assert plan["finetune_epochs"] == {"requested": 20, "used": max(1, int(20 * factor))}
    assert plan["fits"] and plan["estimate_used_seconds"] <= 300.0
    table = bench.markdown({"settings": {"ood": {"d89": ""}, "id_data": "i", "aux_data": "a", "arch": "small_cnn",
                                         "lr": 0.1, "finetune_lr": 0.01}, "plan": plan, "seeds_done": 2,
                            "convention": "c", "machine": "m", "summary": {}})
    assert f"epochs scaled down to fit (pretrain 40 -> {int(40 * factor)}, fine-tune 20 -> {int(20 * factor)}" in table
    cfg.budget_minutes = 1000.0
    plan = bench.make_plan(cfg)
    assert plan["pretrain_epochs"]["used"] == 40 and plan["finetune_epochs"]["used"] == 20
    cfg.budget_minutes = 0.4  # less than the cells' overhead: 1 epoch each, and the table says it does not fit
    plan = bench.make_plan(cfg)
    assert plan["pretrain_epochs"]["used"] == 1 and plan["finetune_epochs"]["used"] == 1 and not plan["fits"]
    # a library call counts from itself: a notebook that imported kood.bench 10 minutes ago (or a sweep
    # script's earlier benches) had that time taken from the budget (1 epoch each, "does not fit")
    monkeypatch.setattr(bench, "STARTED", bench.time.perf_counter() - 600.0)
    cfg.budget_minutes = 3.0
    plan = bench.make_plan(cfg)
    assert plan["planning_seconds"] < 1.0 and plan["fits"] and plan["pretrain_epochs"]["used"] > 1


@pytest.mark.filterwarnings("error:.*shuffle=True. was passed")  # Keras' warning for fit(Dataset) without shuffle=False
def test_speed_writes_ratios_to_ce(sets, tmp_path):
    cfg = _cfg(sets, str(tmp_path / "speed"), methods=["greg"], detectors=[])
    speed = bench.run_speed(cfg, steps=2, reps=2, pipeline_batches=3)
    on_disk = json.load(open(os.path.join(cfg.output, "speed.json")))
    assert set(on_disk["methods"]) == {"ce", "greg"}
    ce = speed["methods"]["ce"]
    assert ce["step_ratio"] == 1.0 and ce["pipeline_ratio"] == 1.0
    # the budget's per-cell and per-epoch overheads
    assert all(m["setup_seconds"] > 0 and m["pipeline_start_seconds"] > 0 for m in speed["methods"].values())
    assert speed["checkpoint_seconds"] > 0
    for name in ("greg",):
        m = speed["methods"][name]
        ratios = np.array(m["step_seconds_per_rep"]) / np.array(ce["step_seconds_per_rep"])
        assert m["step_ratio"] == pytest.approx(np.median(ratios))
        assert m["images_per_batch"] == 32  # 16 ID + 16 auxiliary
    assert ce["images_per_batch"] == 16
    assert "| greg |" in open(os.path.join(cfg.output, "speed.md")).read()


def test_cli_reports_bad_flags_clearly(sets, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kood.bench", f"--id_data={sets['id']}", f"--aux_data={sets['aux']}",
                           f"--ood=d89={sets['ood']}", "--methods=ce,greg_pluss", f"--output={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "kood.bench: error: ConfigError: --methods: unknown method 'greg_pluss'" in proc.stderr


def test_init_checkpoint_per_seed(sets, tmp_path):
    only_seed0 = str(tmp_path / "init-{seed}.keras")
    os.link(sets["init"], str(tmp_path / "init-0.keras"))
    cfg = _cfg(sets, str(tmp_path / "out"), init_checkpoint=only_seed0)
    with pytest.raises(DataError, match=r"init-1.keras \(seed 1\) does not exist"):
        bench.run_bench(cfg)
    assert bench.init_checkpoint(cfg, 0) == str(tmp_path / "init-0.keras")


def _mtimes(directory):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(directory) for f in files}


def test_rerun_with_fewer_ood_sets_averages_over_them(sets, tmp_path):
    three = {"d89": sets["ood"], "o2": sets["ood2"], "big": sets["big"]}
    cfg = _cfg(sets, str(tmp_path / "out"), methods=["ce"], seeds=1, ood=three, resize="center_crop")
    stored = bench.run_bench(cfg)["cells"][0]
    cfg.ood = {"d89": sets["ood"], "o2": sets["ood2"]}
    before = _mtimes(os.path.join(cfg.output, "runs"))
    rep = bench.run_bench(cfg)
    assert _mtimes(os.path.join(cfg.output, "runs")) == before  # the cell is reused, not re-evaluated
    for row, sets_of in (("ce+energy-score", stored["ood"]), ("ce+msp", stored["detectors"]["msp"]["ood"])):
        expected = np.mean([sets_of["d89"]["fpr95"], sets_of["o2"]["fpr95"]])
        assert rep["summary"][row]["fpr95/average"]["mean"] == pytest.approx(expected)
    # AUROC, not FPR95: a barely trained model can have FPR95 = 1 on every set, where the averages coincide.
    assert stored["average"]["auroc"] == pytest.approx(np.mean([stored["ood"][n]["auroc"] for n in three]))
    assert stored["average"]["auroc"] != pytest.approx(rep["summary"]["ce+energy-score"]["auroc/average"]["mean"])
    stat = rep["summary"]["ce+energy-score"]
    assert rep["cells"][0]["average"]["fpr95"] == pytest.approx(stat["fpr95/average"]["mean"])  # results.json
    assert set(rep["cells"][0]["energy_stats"]["ood"]) == {"d89", "o2"}
    table = open(os.path.join(cfg.output, "results.md")).read()
    assert (f"{_pm(stat['fpr95/o2'])} | {_pm(stat['auroc/o2'])} | {_pm(stat['fpr95/average'])} | "
            f"{_pm(stat['auroc/average'])} |") in table


def _pm(stat):
    assert stat["n"] == 1  # one seed: the mean alone, no "± 0.00"
    return f"{stat['mean'] * 100:.2f}"


@pytest.mark.parametrize("change, match", [
    (dict(ood=None), r"runs/ce/seed-0 lacks OOD set 'o2'; .*runs/greg\+sio/seed-0 lacks OOD set 'o2'"),
    (dict(detectors=["msp", "max_logit"]), r"runs/ce/seed-1 lacks detector 'max_logit'\. "),
    (dict(ood="other dir"), r"lacks OOD set 'd89' from .*ood2 \(it holds .*ood\)"),
])
def test_rerun_needing_results_cells_lack_is_refused_before_any_work(report, sets, change, match):
    cfg, _ = report
    ood = {"d89": sets["ood2"]} if change.get("ood") == "other dir" else {"d89": sets["ood"], "o2": sets["ood2"]}
    changed = bench.BenchConfig(**{**vars(cfg), "ood": ood if "ood" in change else cfg.ood,
                                   "detectors": change.get("detectors", cfg.detectors)})
    before = _mtimes(cfg.output)
    with pytest.raises(ConfigError, match=match) as e:
        bench.run_bench(changed)
    assert "rerun with what they hold (--ood=d89=" in str(e.value) and "--detectors=msp" in str(e.value)
    assert _mtimes(cfg.output) == before  # nothing trained, evaluated or rewritten


def test_moved_output_resumes(sets, tmp_path, monkeypatch):
    cfg = _cfg(sets, str(tmp_path / "out"), methods=["ce", "energy"], seeds=1, init_checkpoint=None,
               pretrain_epochs=1, detectors=[])
    bench.run_bench(cfg)
    moved = str(tmp_path / "moved")
    shutil.copytree(cfg.output, moved)
    shutil.rmtree(cfg.output)
    os.remove(os.path.join(bench.cell_dir(bench.BenchConfig(**{**vars(cfg), "output": moved}), "energy", 0),
                           bench.RESULT_FILE))  # a cell interrupted before its result: kood.run resumes it
    trained = []
    real = bench.run.run_training
    monkeypatch.setattr(bench.run, "run_training", lambda rc: trained.append(rc.model_dir) or real(rc))
    cfg.output = moved
    rep = bench.run_bench(cfg)
    assert trained == [bench.cell_dir(cfg, "energy", 0)]  # pretraining and the ce cell were reused
    assert [c["method"] for c in rep["cells"]] == ["ce", "energy"]
    stored = json.load(open(os.path.join(bench.cell_dir(cfg, "energy", 0), bench.RESULT_FILE)))
    assert stored["settings"]["init_checkpoint"] == os.path.join("{output}", "pretrain", "seed-0", "last.keras")


def test_budget_scaling_is_printed_before_training(sets, tmp_path, monkeypatch, capsys):
    fake = {"methods": {m: {"step_seconds": 0.05, "pipeline_batches_per_second": 100.0, "setup_seconds": 1.0,
                            "pipeline_start_seconds": 0.1} for m in ("ce", "energy")}, "checkpoint_seconds": 0.1}
    monkeypatch.setattr(bench, "measure_speed", lambda cfg, methods, steps, reps, pipeline_batches: fake)

    def no_training(rc):
        raise RuntimeError("training started")

    monkeypatch.setattr(bench.run, "run_training", no_training)
    cfg = _cfg(sets, str(tmp_path / "o"), methods=["ce", "energy"], init_checkpoint=None, pretrain_epochs=40,
               finetune_epochs=20, steps_per_epoch=50, budget_minutes=3.0)
    with pytest.raises(RuntimeError, match="training started"):
        bench.run_bench(cfg)
    plan = json.load(open(os.path.join(cfg.output, "plan.json")))
    assert plan["pretrain_epochs"]["used"] < 40
    assert (f"Budget: --budget_minutes=3.0: epochs scaled down to fit (pretrain 40 -> "
            f"{plan['pretrain_epochs']['used']}") in capsys.readouterr().err


@pytest.mark.parametrize("flag, match", [
    ("aux_data", r"--aux_data=.*big holds \[10, 10, 1\] images, --id_data=.* holds \[8, 8, 1\]: convert"),
    ("ood", r"--ood set 'd89': .*big holds \[10, 10, 1\] images.*pass --resize=resize or --resize=center_crop"),
    ("id_data", r"--id_data=.*ood: the ID set must be a labelled 'real'.*Received: kind='ood'"),
])
def test_data_sets_are_checked_against_the_id_set_before_any_work(sets, tmp_path, flag, match):
    out = str(tmp_path / "out")
    value = {"aux_data": sets["big"], "ood": {"d89": sets["big"]}, "id_data": sets["ood"]}[flag]
    with pytest.raises(DataError, match=match):
        bench.run_bench(_cfg(sets, out, init_checkpoint=None, **{flag: value}))
    assert not os.path.exists(out)


def test_output_that_is_a_file_stops_before_any_work(sets, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="--output=.*a_file is a file, not a directory"):
        bench.run_bench(_cfg(sets, str(a_file), init_checkpoint=None))


def test_cli_speed_passes_pipeline_batches_and_resize(sets, tmp_path):
    out = tmp_path / "speed"
    proc = subprocess.run([sys.executable, "-m", "kood.bench", f"--id_data={sets['id']}", f"--aux_data={sets['aux']}",
                           f"--ood=big={sets['big']}", "--resize=center_crop", "--methods=ce", "--arch_kwargs=width=4",
                           "--batch_size=16", "--speed", "--speed_steps=1", "--speed_reps=1",
                           "--speed_pipeline_batches=3", f"--output={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.load(open(out / "speed.json"))["pipeline_batches"] == 3


def test_ce_cell_is_reevaluated_when_its_settings_change(report):
    cfg, rep = report
    path = os.path.join(bench.cell_dir(cfg, "ce", 0), bench.RESULT_FILE)
    before = os.stat(path).st_mtime_ns
    changed = bench.BenchConfig(**{**vars(cfg), "method_flags": {"*": {"m_in": -9.0, "m_out": -2.0}}})
    with pytest.raises(ConfigError, match=r"no --method_flags for greg\+sio \(now --method_flags=greg\+sio:m_in=-9.0,"):
        bench.run_bench(changed)  # the trained greg+sio cell was trained with other margins
    assert os.stat(path).st_mtime_ns == before  # refused before any work
    changed.methods = ["ce"]
    bench.run_bench(changed)
    after = json.load(open(path))
    assert os.stat(path).st_mtime_ns != before
    assert after["energy_stats"]["m_in"] == -9.0
    assert after["ood"] == next(c for c in rep["cells"] if c["method"] == "ce" and c["seed"] == 0)["ood"]


def test_a_second_bench_into_a_running_benchs_output_is_refused(sets, tmp_path):
    from tests.data_helpers import held_elsewhere

    out = tmp_path / "o"
    other = held_elsewhere(str(out))
    for run in (bench.run_bench, bench.run_speed):
        with pytest.raises(bench.DataError, match=f"{out}: pid 4242 on elsewhere is running a bench into this "
                                                  "--output .*or use another --output"):
            run(_cfg(sets, str(out), methods=["ce", "energy"], seeds=1))
    assert os.listdir(out) == [".kood-writing.lock"]
    other.close()
