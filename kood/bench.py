r"""Paper-style comparison of OOD training methods on any kood data: `python -m kood.bench`.

One CE model is pretrained per seed (or `--init_checkpoint` is used), every listed method is
fine-tuned from it with the same budget, and each model is scored with its training score
(energy) on every OOD set vs the ID test split. Outputs under `--output`:

- `pretrain/seed-S/`, `runs/METHOD/seed-S/`: the `kood.run` model dirs; each cell also holds
  `bench_result.json` (written last, atomically: its presence marks a finished cell) and
  `scores.npz` (the energies behind the plots);
- `results.json` (every number per (method, seed), the mean/std table, settings, machine),
  `results.md` (the table), `plots/energy_hist.png`, `plots/roc.png`;
- `plan.json`: the epochs used (scaled down by `--budget_minutes`), so a rerun resumes the same plan.

A rerun skips finished cells (paths inside `--output` are stored relative to it: a moved output
resumes). It may report a subset of the OOD sets / detectors the cells were evaluated on (each
cell records them under `evaluated_on`; averages are over the reported sets); asking for one a
finished cell lacks is refused before any work, so earlier results are never replaced; so is a
changed training setting (e.g. `--lr`) of a run it would resume or reuse.

Method names: any `kood.methods.METHODS` preset; `NAME+sio` = that method with SIO
(`--sio_ratio` real fraction per batch, `--syn_data` images); `ce` = the pretrained CE model
itself scored with the energy score ("ce+energy-score") and with each `--detectors` detector.

`--speed` instead measures the training step time per method and the input-pipeline throughput,
as ratios to plain CE on the same model in the same process (repetitions interleaved so machine
noise hits every method alike), and writes `speed.md` / `speed.json`.

Example:
    python -m kood.bench --id_data=data/mnist --aux_data=data/kmnist --ood=fashion=data/fashion \
        --methods=ce,energy,greg,greg_plus --seeds=3 --pretrain_epochs=10 --finetune_epochs=5 \
        --output=bench_out
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
import time

# The command's start (`python -m kood.bench`: before TensorFlow's import, which `import kood` does): the CLI's
# --budget_minutes counts the whole command. A library call of run_bench counts from the call instead.
STARTED = getattr(sys.modules.get("kood"), "_CLI_STARTED", None) or time.perf_counter()

import numpy as np

import tensorflow as tf

from kood import checkpoint, data, run
from kood.detectors.energy import energy_score
from kood.errors import ConfigError, DataError, check_output_dir, parse_key_values, run_app
from kood.evaluate import evaluate, parse_detectors, parse_ood
from kood.manifest import ID_KINDS, json_text, read_json, read_manifest, read_manifest_of, write_text_atomic
from kood.methods import METHODS, method_config, resolve_pool_factor
from kood.models import PRECISIONS, build_classifier, load_classifier
from kood.progress import Progress
from kood.run import RunConfig
from kood.writer import locked_output

SIO_SUFFIX = "+sio"
CE_ROW = "ce+energy-score"
RESULT_FILE = "bench_result.json"
OUTPUT_TOKEN = "{output}"  # stored paths inside --output start with it: a moved output resumes
PATH_KEYS = ("model_dir", "init_checkpoint", "init")  # signature entries that are paths
AUX_STATS_LIMIT = 2000  # auxiliary images scored for the energy statistics of each cell


@dataclasses.dataclass
class BenchConfig:
    """Settings of one comparison; `python -m kood.bench --help` documents each as a flag.

    Args:
        id_data: ID kood dataset dir (splits train and test).
        aux_data: auxiliary outlier dataset dir (energy / GReg / GReg+ training).
        ood: `{name: dataset dir}` held-out OOD sets.
        output: output directory.
        methods: method names (see module docstring); `ce` = the pretrained baseline.
        seeds: number of seeds (0 .. seeds-1).
        syn_data: synthetic ID dataset dir, needed by `+sio` methods.
        sio_ratio: real fraction of each batch in `+sio` methods.
        arch, arch_kwargs: model (kood.models).
        pretrain_epochs, finetune_epochs: requested epochs (budget scaling may lower them).
        init_checkpoint: use this classifier instead of pretraining; `{seed}` in it is replaced by the
            seed (e.g. another bench's `OUT/pretrain/seed-{seed}/last.keras`), else every seed uses it.
        detectors: post-hoc detectors applied to the CE baseline (`ce` must be in methods).
        resize: how OOD sets of another image size are fed to the models (kood.evaluate's resize:
            "error", "resize" or "center_crop"); auxiliary and synthetic sets must have the ID size.
        budget_minutes: scale epochs down so the whole bench fits (None = no scaling).
        batch_size, lr, finetune_lr, optimizer, weight_decay, augment, steps_per_epoch, precision: RunConfig knobs
            (lr for pretraining, finetune_lr for fine-tuning).
        method_flags: `{method name or "*": {hyperparameter: value}}` MethodConfig overrides; `*`
            applies to every fine-tuned method, a base name (greg) also to its `+sio` variant.
        verbose: Keras progress output of the training runs.

    Example:
        BenchConfig(id_data="data/mnist", aux_data="data/kmnist", ood={"fashion": "data/fashion"},
                    output="out", methods=["ce", "energy", "greg"], seeds=1)
    """

    id_data: str
    aux_data: str | None
    ood: dict
    output: str
    methods: list = dataclasses.field(default_factory=lambda: ["ce", "energy", "greg", "greg_plus"])
    seeds: int = 3
    syn_data: str | None = None
    sio_ratio: float = 0.8
    arch: str = "small_cnn"
    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    pretrain_epochs: int = 10
    finetune_epochs: int = 5
    init_checkpoint: str | None = None
    detectors: list = dataclasses.field(default_factory=list)
    resize: str = "error"
    budget_minutes: float | None = None
    batch_size: int = 64
    lr: float = 0.1
    finetune_lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    augment: bool = True
    steps_per_epoch: int = 0
    precision: str = "float32"
    method_flags: dict = dataclasses.field(default_factory=dict)
    verbose: int = 0


# ----------------------------------------------------------------------------------------------
# Flag parsing and validation


def split_method(name: str) -> tuple[str, bool]:
    """`"greg+sio"` -> `("greg", True)`; `"energy"` -> `("energy", False)`."""
    if name.endswith(SIO_SUFFIX):
        return name[: -len(SIO_SUFFIX)], True
    return name, False


def parse_method_flags(spec: str) -> dict[str, dict]:
    """`"greg:grad_weight=0.1,m_in=-12;*:m_out=-5"` -> `{"greg": {...}, "*": {"m_out": -5}}`.

    Example:
        parse_method_flags("*:m_in=-12,m_out=-4")
    """
    out: dict[str, dict] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        method, sep, kv = part.partition(":")
        if not sep or not method.strip():
            raise ConfigError(f"--method_flags must be METHOD:key=value[,key=value][;METHOD:...] (METHOD may be *). "
                              f"Received: {part!r}")
        out.setdefault(method.strip(), {}).update(parse_key_values(kv, "method_flags"))
    return out


def method_overrides(cfg: BenchConfig, name: str) -> dict:
    """MethodConfig overrides of a listed method: `*`, then its base name, then its full name."""
    base, _ = split_method(name)
    merged = {}
    for key in ("*", base, name):
        merged.update(cfg.method_flags.get(key, {}))
    return merged


def validate(cfg: BenchConfig) -> None:
    """Checks every setting (and that every data dir holds a dataset) before any work.

    Raises:
        ConfigError / DataError naming the flag or directory.
    """
    if not cfg.methods:
        raise ConfigError(f"--methods needs at least one method. Received: methods={cfg.methods!r}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"--methods lists a method twice. Received: methods={cfg.methods!r}")
    for name in cfg.methods:
        base, sio = split_method(name)
        if name != "ce" and base not in METHODS:
            raise ConfigError(f"--methods: unknown method {name!r}. Known: ce (the pretrained baseline), "
                              f"{sorted(METHODS)}, each optionally with the suffix {SIO_SUFFIX}. "
                              f"Received: methods={cfg.methods!r}")
        if sio and not cfg.syn_data:
            raise ConfigError(f"--methods: {name!r} trains with synthetic ID images: it needs --syn_data=DIR")
    stray = [k for k in cfg.method_flags if k != "*" and k not in cfg.methods
             and k not in {split_method(m)[0] for m in cfg.methods}]
    if stray:
        raise ConfigError(f"--method_flags names methods not in --methods: {stray}. Received: methods={cfg.methods}")
    for name, value in (("seeds", cfg.seeds), ("pretrain_epochs", cfg.pretrain_epochs),
                        ("finetune_epochs", cfg.finetune_epochs)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be an integer >= 1. Received: {name}={value!r}")
    if cfg.budget_minutes is not None and cfg.budget_minutes <= 0:
        raise ConfigError(f"--budget_minutes must be > 0. Received: budget_minutes={cfg.budget_minutes}")
    if cfg.finetune_lr <= 0:
        raise ConfigError(f"--finetune_lr must be > 0. Received: finetune_lr={cfg.finetune_lr}")
    if not cfg.ood:
        raise ConfigError("--ood needs at least one held-out OOD set: name=DIR[,name=DIR]. Received: ood={}")
    if cfg.detectors:
        parse_detectors(",".join(cfg.detectors))
        if "ce" not in cfg.methods:
            raise ConfigError(f"--detectors={','.join(cfg.detectors)} are applied to the CE baseline: "
                              f"add ce to --methods. Received: methods={cfg.methods}")
    if not cfg.output:
        raise ConfigError("--output is required (the bench directory)")
    check_output_dir(cfg.output)
    if cfg.resize not in data.RESIZE_MODES:
        raise ConfigError(f"--resize must be one of {data.RESIZE_MODES}. Received: resize={cfg.resize!r}")
    check_data(cfg)
    for seed in range(cfg.seeds) if cfg.init_checkpoint else ():
        if not os.path.exists(init_checkpoint(cfg, seed)):
            raise DataError(f"--init_checkpoint={cfg.init_checkpoint}: {init_checkpoint(cfg, seed)} (seed {seed}) "
                            "does not exist")
    for name in cfg.methods:  # RunConfig-level checks (aux data present, sio ratio, lr, ...)
        try:
            mcfg = run.validate(run_config(cfg, name, 0, cfg.finetune_epochs, "/nonexistent"))
        except ConfigError as e:  # kood.train's wording (--pool_factor) says nothing of where a bench sets it
            base, _ = split_method(name)
            entries = [key for key in dict.fromkeys(("*", base, name)) if cfg.method_flags.get(key)]
            keys = {k for key in entries for k in cfg.method_flags[key]}
            if not any(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", str(e)) for k in keys):
                raise  # not about a --method_flags value (e.g. --batch_size x --sio_ratio): not blamed on them
            given = ";".join(f"{key}:" + ",".join(f"{k}={v}" for k, v in cfg.method_flags[key].items())
                             for key in entries)
            raise ConfigError(f"--methods={name} with --method_flags {given} (METHOD:key=value; the message names "
                              f"kood.train's flag for the key): {e}") from None
        if mcfg.uses_aux:  # aux batch / GReg+ pool vs the set: kood.run checks it as the cell starts, after pretraining
            try:
                run.check_aux_size(mcfg, cfg.batch_size, read_manifest(cfg.aux_data).count("train"),
                                   read_manifest(cfg.id_data).count("train"), cfg.aux_data)
            except ConfigError as e:
                key = "pool_factor" if mcfg.sampler == "energy_cluster" else "aux_batch_factor"
                raise ConfigError(f"--methods={name}: {e} (in kood.bench: --batch_size, or --method_flags="
                                  f"{split_method(name)[0]}:{key}=...)") from None
    run.validate(pretrain_config(cfg, 0, cfg.pretrain_epochs))


def check_data(cfg: BenchConfig) -> None:
    """Checks every data set's manifest against the ID set before any training.

    The ID set must be a labelled real (or synthetic) set with train and test splits; auxiliary
    and synthetic sets must have the ID image shape (training cannot convert them); an OOD set
    of another shape needs `--resize` (kood.evaluate converts it).

    Raises:
        DataError naming the flag and directory.
    """
    id_m = read_manifest_of("--id_data=", cfg.id_data)
    if id_m.kind not in ID_KINDS or id_m.num_classes < 2:
        raise DataError(f"--id_data={cfg.id_data}: the ID set must be a labelled 'real' (or 'synthetic') set with "
                        ">= 2 classes. "
                        f"Received: kind={id_m.kind!r}, num_classes={id_m.num_classes}")
    for split in ("train", "test"):
        id_m.split(split, f"--id_data={cfg.id_data}")
    for flag, directory in (("--aux_data", cfg.aux_data), ("--syn_data", cfg.syn_data)):
        shape = read_manifest_of(f"{flag}=", directory).shape if directory else id_m.shape
        if shape != id_m.shape:
            raise DataError(f"{flag}={directory} holds {list(shape)} images, --id_data="
                            f"{cfg.id_data} holds {list(id_m.shape)}: convert the set to the ID size (data_prep "
                            "--image_size=... --resize=..., see the README's Workflow 1)")
    for name, directory in cfg.ood.items():
        flag = f"--ood set {name!r}"
        shape = read_manifest_of(f"{flag}: ", directory).shape
        if shape != id_m.shape and cfg.resize == "error":
            raise DataError(f"{flag}: {directory} holds {list(shape)} images, --id_data={cfg.id_data} holds "
                            f"{list(id_m.shape)}: pass --resize=resize or --resize=center_crop to convert it, or "
                            "convert the set to the ID size (data_prep --image_size=...)")
        try:  # the test split, and whether --resize can convert it (channels, center_crop size)
            data.eval_dataset(directory, "test", image_size=id_m.shape, resize=cfg.resize)
        except DataError as e:
            raise DataError(f"{flag}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Run configs of the cells


def _common(cfg: BenchConfig) -> dict:
    return dict(id_data=cfg.id_data, arch=cfg.arch, arch_kwargs=dict(cfg.arch_kwargs), optimizer=cfg.optimizer,
                weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, augment=cfg.augment,
                steps_per_epoch=cfg.steps_per_epoch, precision=cfg.precision, val_split="none", verbose=cfg.verbose)


def init_checkpoint(cfg: BenchConfig, seed: int) -> str:
    """`--init_checkpoint` of one seed (`{seed}` replaced)."""
    return cfg.init_checkpoint.replace("{seed}", str(seed))


def init_file(cfg: BenchConfig, seed: int) -> str:
    """The classifier every cell of a seed starts from: `--init_checkpoint` or the pretrained model."""
    return init_checkpoint(cfg, seed) if cfg.init_checkpoint else os.path.join(pretrain_dir(cfg, seed), "last.keras")


def pretrain_dir(cfg: BenchConfig, seed: int) -> str:
    return os.path.join(cfg.output, "pretrain", f"seed-{seed}")


def cell_dir(cfg: BenchConfig, name: str, seed: int) -> str:
    return os.path.join(cfg.output, "runs", name, f"seed-{seed}")


def pretrain_config(cfg: BenchConfig, seed: int, epochs: int) -> RunConfig:
    """The CE pretraining run of one seed (val_split none: the test split never picks a checkpoint)."""
    return RunConfig(model_dir=pretrain_dir(cfg, seed), method="ce", lr=cfg.lr, epochs=epochs, seed=seed,
                     **_common(cfg))


def run_config(cfg: BenchConfig, name: str, seed: int, epochs: int, init: str) -> RunConfig:
    """The fine-tuning run of method `name` (e.g. `greg+sio`) from the classifier `init`."""
    base, sio = split_method(name)
    return RunConfig(model_dir=cell_dir(cfg, name, seed), method=base, method_overrides=method_overrides(cfg, name),
                     aux_data=cfg.aux_data if method_config(base, **method_overrides(cfg, name)).uses_aux else None,
                     syn_data=cfg.syn_data if sio else None, sio_ratio=cfg.sio_ratio if sio else 1.0,
                     lr=cfg.finetune_lr, epochs=epochs, seed=seed, init_checkpoint=init, **_common(cfg))


def _steps_per_epoch(cfg: BenchConfig, name: str) -> int:
    _, sio = split_method(name)
    real = int(cfg.batch_size * (cfg.sio_ratio if sio else 1.0))
    return cfg.steps_per_epoch or max(1, read_manifest(cfg.id_data).count("train") // max(1, real))


# ----------------------------------------------------------------------------------------------
# Speed: step time and pipeline throughput per method, as ratios to CE


def _train_pipeline(cfg: BenchConfig, name: str, trainer, seed: int = 0):
    """The input pipeline a run of `name` trains on (as kood.run builds it)."""
    _, sio = split_method(name)
    id_ds, _ = data.train_dataset(cfg.id_data, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed,
                                  syn_directory=cfg.syn_data if sio else None,
                                  sio_ratio=cfg.sio_ratio if sio else 1.0)
    if not trainer.config.uses_aux:
        return id_ds
    aux = data.outlier_stream(cfg.aux_data, batch_size=trainer.aux_batch_size(cfg.batch_size), augment=cfg.augment,
                              seed=seed, image_shape=read_manifest(cfg.id_data).shape)
    return tf.data.Dataset.zip((id_ds, aux))


def measure_speed(cfg: BenchConfig, methods: list[str], steps: int = 20, reps: int = 5,
                  pipeline_batches: int = 100) -> dict:
    """Step time and input-pipeline throughput of each method, and their ratios to plain CE.

    Every method gets its own model and trainer in this process. The step time is measured on
    one fixed in-memory batch (compute only); the pipeline on its real `tf.data` input alone.
    Repetitions are interleaved (the order rotates) and each ratio is the median over repetitions
    of (method time / CE time in the same repetition), so load from other processes cancels out.

    Args:
        cfg: the bench settings (data, arch, batch size, method flags).
        methods: method names; `ce` is added as the reference.
        steps: train steps per step timing.
        reps: repetitions.
        pipeline_batches: batches per pipeline timing (enough that the prefetch buffer does not count).

    Returns:
        `{"methods": {name: {"step_seconds", "step_ratio", "pipeline_batches_per_second",
        "pipeline_images_per_second", "pipeline_ratio", "setup_seconds", "pipeline_start_seconds"}},
        "checkpoint_seconds", "steps", "reps", "batch_size", "arch"}`;
        `setup_seconds`: model build, compile, first batch and the first (traced) train steps, once;
        `pipeline_start_seconds`: a fresh input pipeline's first batch (every epoch starts one);
        `checkpoint_seconds`: what a run writes after each epoch (checkpoint, last.keras, best.keras).

    Example:
        measure_speed(cfg, ["energy", "greg", "greg_plus"], steps=10, reps=3)
    """
    import keras

    from kood.trainer import OODTrainer

    if min(steps, reps, pipeline_batches) < 1:
        raise ConfigError(f"speed measurement needs steps, reps and pipeline_batches >= 1. Received: steps={steps}, "
                          f"reps={reps}, pipeline_batches={pipeline_batches}")
    names = ["ce"] + [m for m in methods if m != "ce"]
    manifest = read_manifest(cfg.id_data)
    trainers, fixed, images_per_batch, setup = {}, {}, {}, {}
    for name in names:
        start = time.perf_counter()
        base, _ = split_method(name)
        keras.utils.set_random_seed(0)
        model = build_classifier(cfg.arch, input_shape=manifest.shape, num_classes=manifest.num_classes,
                                 mean=manifest.mean, std=manifest.std, precision=cfg.precision, **cfg.arch_kwargs)
        mcfg = method_config(base, **method_overrides(cfg, name))
        if cfg.aux_data:  # as kood.run does
            mcfg = resolve_pool_factor(mcfg, read_manifest(cfg.aux_data).count("train"), manifest.count("train"))
        trainer = OODTrainer(model, mcfg, seed=0)
        trainer.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9))
        batch = next(iter(_train_pipeline(cfg, name, trainer)))
        images_per_batch[name] = sum(int(t.shape[0]) for t in tf.nest.flatten(batch) if t.shape.rank == 4)
        fixed[name] = tf.data.Dataset.from_tensors(batch).repeat()
        # shuffle=False: Keras cannot shuffle a Dataset and warns on its default shuffle=True
        trainer.fit(fixed[name], epochs=1, steps_per_epoch=2, shuffle=False, verbose=0)  # trace + compile
        trainers[name] = trainer
        setup[name] = time.perf_counter() - start  # what a training run spends before its steps
    step_times = {n: [] for n in names}
    pipe_times = {n: [] for n in names}
    start_times = {n: [] for n in names}
    with Progress("speed", total=reps * len(names), unit="timing") as bar:
        for rep in range(reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:  # no input pipeline is alive here: its prefetch threads would share the CPU
                start = time.perf_counter()
                trainers[name].fit(fixed[name], epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
                step_times[name].append((time.perf_counter() - start) / steps)
            for name in order:
                # a fresh iterator, warmed by one batch (shuffle buffer filled), then pipeline_batches timed:
                # an iterator kept alive between timings would prefetch while others are timed
                start = time.perf_counter()
                batches = iter(_train_pipeline(cfg, name, trainers[name], seed=rep))
                next(batches)
                start_times[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                for _ in range(pipeline_batches):
                    next(batches)
                pipe_times[name].append((time.perf_counter() - start) / pipeline_batches)
                del batches
                bar.update(1)
    out = {}
    for name in names:
        out[name] = {
            "step_seconds": float(np.median(step_times[name])),
            "step_ratio": float(np.median(np.array(step_times[name]) / np.array(step_times["ce"]))),
            "pipeline_batches_per_second": float(1.0 / np.median(pipe_times[name])),
            "pipeline_images_per_second": float(images_per_batch[name] / np.median(pipe_times[name])),
            "pipeline_ratio": float(np.median(np.array(pipe_times[name]) / np.array(pipe_times["ce"]))),
            "images_per_batch": images_per_batch[name], "setup_seconds": setup[name],
            "pipeline_start_seconds": float(np.median(start_times[name])),
            "step_seconds_per_rep": step_times[name], "pipeline_seconds_per_rep": pipe_times[name],
        }
    return {"methods": out, "checkpoint_seconds": _checkpoint_seconds(trainers["ce"]),
            "steps": steps, "reps": reps, "pipeline_batches": pipeline_batches,
            "batch_size": cfg.batch_size, "arch": cfg.arch, "machine": machine()}


def _checkpoint_seconds(trainer) -> float:
    """Time of one epoch's writes in kood.run (checkpoint, last.keras and best.keras), into a temp dir."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kood-bench-") as tmp:
        start = time.perf_counter()
        state = {"epoch": 1, "best_epoch": 1, "history": [], "finished": False}
        checkpoint.save(os.path.join(tmp, "ckpt"), trainer.classifier, trainer.optimizer, state)
        run._keras_files(trainer.classifier, tmp, state)
        return time.perf_counter() - start


def speed_markdown(speed: dict) -> str:
    lines = [f"# kood.bench --speed ({speed['arch']}, batch {speed['batch_size']}, {speed['steps']} steps x "
             f"{speed['reps']} interleaved repetitions)", "",
             f"Machine: {speed['machine']}", "",
             "Step time: one train step on a fixed in-memory batch (compute only, no input pipeline running). "
             f"Pipeline: the method's tf.data input alone, {speed['pipeline_batches']} batches from a fresh "
             "iterator (images per batch include auxiliary / candidate-pool images). Ratios: median over "
             "repetitions of method / CE in the same repetition (> 1 = slower than CE).", "",
             "| method | step (ms) | step / CE | pipeline batches/s | pipeline images/s | pipeline time / CE |",
             "|---|---|---|---|---|---|"]
    for name, m in speed["methods"].items():
        lines.append(f"| {name} | {m['step_seconds'] * 1000:.1f} | {m['step_ratio']:.2f} | "
                     f"{m['pipeline_batches_per_second']:.1f} | {m['pipeline_images_per_second']:.0f} | "
                     f"{m['pipeline_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def run_speed(cfg: BenchConfig, steps: int = 20, reps: int = 5, pipeline_batches: int = 100) -> dict:
    """`--speed`: measures and writes OUTPUT/speed.json and speed.md."""
    validate(cfg)
    with lock_output(cfg):
        speed = measure_speed(cfg, cfg.methods, steps, reps, pipeline_batches)
        write_text_atomic(os.path.join(cfg.output, "speed.md"), speed_markdown(speed))
        write_text_atomic(os.path.join(cfg.output, "speed.json"), json_text(speed))
    return speed


# ----------------------------------------------------------------------------------------------
# Budget plan


def make_plan(cfg: BenchConfig, started: float | None = None) -> dict:
    """Epochs to use: the requested ones, or scaled down (never up) to fit `budget_minutes`.

    The budget counts from `started` (a `time.perf_counter()` value; the CLI passes the command's start, so
    import and reading the sets count; default: this call), this planning included. The estimate is
    seeds x (pretrain epochs x CE epoch time + fine-tune epochs x each method's epoch time), with
    epoch time = steps x (compute + input-pipeline time per batch) + a fresh pipeline's first batch +
    the epoch's checkpoint writes, all from `measure_speed` (a few steps); plus each cell's overhead,
    also from `measure_speed`: the setup (model build, compile, first traced steps) of each training
    run, and for each evaluated cell a CE setup (model load and tracing) plus one forward pass over
    its test images (`_eval_images`; a third of a CE train step per batch: backward costs about two
    forwards). Both epoch counts are scaled by the same factor.
    """
    started = time.perf_counter() if started is None else started
    plan = {"budget_minutes": cfg.budget_minutes,
            "pretrain_epochs": {"requested": cfg.pretrain_epochs, "used": cfg.pretrain_epochs},
            "finetune_epochs": {"requested": cfg.finetune_epochs, "used": cfg.finetune_epochs}}
    if cfg.budget_minutes is None:
        return plan
    trained = [m for m in cfg.methods if m != "ce"]
    print("budget: timing a few steps per method ...", file=sys.stderr)
    measured = measure_speed(cfg, trained, steps=5, reps=2, pipeline_batches=20)
    speed = measured["methods"]

    def seconds(name):
        m = speed[name]
        return m["step_seconds"] + 1.0 / m["pipeline_batches_per_second"]

    def epoch(name):
        return (_steps_per_epoch(cfg, name) * seconds(name) + speed[name]["pipeline_start_seconds"]
                + measured["checkpoint_seconds"])

    pre = 0.0 if cfg.init_checkpoint else cfg.pretrain_epochs * epoch("ce")
    fine = sum(cfg.finetune_epochs * epoch(m) for m in trained)
    setup = {m: speed[m]["setup_seconds"] for m in speed}
    evaluation = setup["ce"] + _eval_images(cfg) / cfg.batch_size * speed["ce"]["step_seconds"] / 3
    # per seed: pretraining (no evaluation), the evaluation-only ce cell, each trained cell
    per_seed = (0.0 if cfg.init_checkpoint else setup["ce"]) + len(cfg.methods) * evaluation
    spent = time.perf_counter() - started  # the command (or run_bench call) so far: e.g. imports, this timing
    overhead = spent + cfg.seeds * (per_seed + sum(setup[m] for m in trained))
    train = cfg.seeds * (pre + fine)
    budget = cfg.budget_minutes * 60.0
    factor = min(1.0, max(0.0, budget - overhead) / train) if train > 0 else 1.0
    for key in ("pretrain_epochs", "finetune_epochs"):
        plan[key]["used"] = max(1, int(plan[key]["requested"] * factor))
    used = cfg.seeds * (pre * plan["pretrain_epochs"]["used"] / cfg.pretrain_epochs
                        + fine * plan["finetune_epochs"]["used"] / cfg.finetune_epochs) + overhead
    plan.update(estimate_seconds=round(train + overhead, 1), overhead_seconds=round(overhead, 1),
                planning_seconds=round(spent, 1), scale=round(factor, 4),
                estimate_used_seconds=round(used, 1), fits=used <= budget,
                step_seconds={m: round(seconds(m), 5) for m in speed},
                epoch_seconds={m: round(epoch(m), 3) for m in speed})
    return plan


def _eval_images(cfg: BenchConfig) -> int:
    """Images one cell's evaluation scores: the ID test split, each OOD set's and the auxiliary sample."""
    count = read_manifest(cfg.id_data).count("test") + sum(read_manifest(d).count("test") for d in cfg.ood.values())
    if cfg.aux_data:
        aux = read_manifest(cfg.aux_data)
        count += min(AUX_STATS_LIMIT, aux.count(next(iter(aux.splits))))
    return count


def _load_or_make_plan(cfg: BenchConfig, started: float | None = None) -> dict:
    path = os.path.join(cfg.output, "plan.json")
    if os.path.exists(path):
        plan = read_json(path, "bench plan")
        same = (plan["budget_minutes"] == cfg.budget_minutes
                and plan["pretrain_epochs"]["requested"] == cfg.pretrain_epochs
                and plan["finetune_epochs"]["requested"] == cfg.finetune_epochs)
        if not same:
            raise ConfigError(f"--output={cfg.output} holds a bench planned with other epochs/budget ({path}: "
                              f"{plan}); use a new --output or the same --pretrain_epochs/--finetune_epochs/"
                              "--budget_minutes")
        return plan
    plan = make_plan(cfg, started)
    os.makedirs(cfg.output, exist_ok=True)
    write_text_atomic(path, json.dumps(plan, indent=2) + "\n")
    return plan


# ----------------------------------------------------------------------------------------------
# Cells


def _portable(cfg: BenchConfig, path: str | None) -> str | None:
    """A path inside --output as `{output}/REL` (so a moved output still matches), any other as absolute."""
    if not path or path.startswith(OUTPUT_TOKEN):
        return path
    full, out = os.path.abspath(path), os.path.abspath(cfg.output)
    if os.path.commonpath([full, out]) == out:
        return os.path.join(OUTPUT_TOKEN, os.path.relpath(full, out))
    return full


def _normalised(cfg: BenchConfig, sig):
    """A stored signature with its paths made portable (signatures written before paths were stored so)."""
    if not isinstance(sig, dict):
        return sig
    return {k: _portable(cfg, v) if k in PATH_KEYS and isinstance(v, str) else _normalised(cfg, v)
            for k, v in sig.items()}


def _signature(cfg: BenchConfig, rc: RunConfig) -> dict:
    """The run settings a finished cell must match (JSON-normalised, as stored)."""
    sig = {k: v for k, v in dataclasses.asdict(rc).items() if k not in ("verbose", "log_every", "ood_data")}
    return _effective(_normalised(cfg, json.loads(json.dumps(sig))))


def _effective(sig):
    """A signature whose method flags given with the preset's own value are dropped (the same training)."""
    if isinstance(sig, dict) and "method" in sig and "method_overrides" in sig:
        return {**sig, "method_overrides": run.effective_overrides(sig["method"], sig["method_overrides"])}
    return sig


def _rebase_moved_run(cfg: BenchConfig, rc: RunConfig) -> None:
    """Points a started run's config.json at its current place if the whole --output was moved.

    kood.run refuses to resume a run whose saved model_dir / init_checkpoint differ from the
    current ones; inside a moved output they differ only by the output's own path.
    """
    path = os.path.join(rc.model_dir, "config.json")
    if not os.path.exists(path):
        return
    saved = read_json(path, "run config")
    moved = False
    for key in ("model_dir", "init_checkpoint"):
        now, old = getattr(rc, key), saved.get(key)
        inside = _portable(cfg, now)
        if (old and now and old != now and inside.startswith(OUTPUT_TOKEN)
                and os.path.normpath(old).endswith(os.sep + os.path.relpath(inside, OUTPUT_TOKEN))):
            saved[key], moved = now, True
    if moved:
        write_text_atomic(path, json.dumps(saved, indent=2))


def _as_flag(field: str, value, name: str | None) -> str:
    """A run setting as the kood.bench flag that sets it; `name`: the method, None for CE pretraining."""
    if field == "method_overrides":  # one --method_flags entry per method
        return (f"--method_flags={name}:" + ",".join(f"{k}={v}" for k, v in value.items()) if value
                else f"no --method_flags for {name}")
    flag = {"lr": "lr" if name is None else "finetune_lr",
            "epochs": "pretrain_epochs" if name is None else "finetune_epochs"}.get(field, field)
    if value is None:
        return f"no --{flag}"
    if isinstance(value, dict):  # arch_kwargs
        value = ",".join(f"{k}={v}" for k, v in value.items())
    return f"--{flag}={value}"


def _changed_flags(diff: dict, name: str | None) -> str:
    """`{run setting: (saved, now)}` as kood.bench flags: `--finetune_lr=0.01 (now --finetune_lr=0.5)`."""
    return ", ".join(f"{_as_flag(k, saved, name)} (now {_as_flag(k, now, name)})" for k, (saved, now) in diff.items())


def check_started_runs(cfg: BenchConfig, plan: dict) -> None:
    """Refuses, before any work, settings that differ from those of a run this bench would resume or reuse.

    kood.run refuses them too, but only when that run's turn comes, and in kood.train's flag names.
    """
    changed: dict[str, list[str]] = {}
    for seed in range(cfg.seeds):
        runs = [] if cfg.init_checkpoint else [(None, pretrain_config(cfg, seed, plan["pretrain_epochs"]["used"]))]
        runs += [(name, run_config(cfg, name, seed, plan["finetune_epochs"]["used"], init_file(cfg, seed)))
                 for name in cfg.methods if name != "ce"]
        for name, rc in runs:
            _rebase_moved_run(cfg, rc)  # a moved --output differs in its paths only
            diff = run.settings_diff(rc)
            if diff:
                changed.setdefault(_changed_flags(diff, name), []).append(os.path.relpath(rc.model_dir, cfg.output))
    if changed:
        raise ConfigError(f"--output={cfg.output} holds runs started with other settings: "
                          + "; ".join(f"{', '.join(dirs)} with {flags}" for flags, dirs in changed.items())
                          + ". Use a new --output for these settings, or rerun with the saved ones to resume them.")


def _finished(cfg: BenchConfig, directory: str, signature: dict, trained: bool = True) -> dict | None:
    """The cell's result if it finished with these settings, else None.

    A trained cell finished with other settings is a ConfigError (its model would not match); an
    evaluation-only cell (`ce`) is simply evaluated again.
    """
    path = os.path.join(directory, RESULT_FILE)
    if not os.path.exists(path):
        return None
    result = read_json(path, "bench cell result")
    result["settings"] = _effective(_normalised(cfg, result.get("settings")))
    if result["settings"] != signature:
        if not trained:
            return None
        old = result.get("settings") or {}
        diff = {k: (old.get(k), v) for k, v in signature.items() if old.get(k) != v}
        raise ConfigError(f"{path} is a finished cell with other settings: "
                          f"{_changed_flags(diff, result['method'])}; use a new --output to run a different bench")
    return result


def _energy_stats(model, cfg: BenchConfig, mcfg, s_id: np.ndarray, s_ood: dict) -> dict:
    """Energy ranges of ID test / auxiliary / OOD images and where they fall w.r.t. the margins."""
    pct = lambda s: {f"p{q}": float(np.percentile(s, q)) for q in (5, 50, 95)}  # noqa: E731
    stats = {"m_in": mcfg.m_in, "m_out": mcfg.m_out, "id": pct(s_id),
             "id_below_m_in": float(np.mean(s_id < mcfg.m_in)),
             "ood": {k: {**pct(v), "above_m_out": float(np.mean(v > mcfg.m_out))} for k, v in s_ood.items()}}
    if cfg.aux_data:
        aux_split = next(iter(read_manifest(cfg.aux_data).splits))
        s_aux = np.concatenate([
            energy_score(model(x, training=False).numpy(), mcfg.temperature)
            for x, _ in data.eval_dataset(cfg.aux_data, aux_split, batch_size=256, limit=AUX_STATS_LIMIT)])
        stats["aux"] = {**pct(s_aux), "above_m_out": float(np.mean(s_aux > mcfg.m_out))}
    return stats


def _train_log(model_dir: str) -> dict:
    """Last-epoch training means (mask fractions, energies, losses) from the run's TensorBoard log."""
    log_dir = os.path.join(model_dir, "logs", "epoch")
    if not os.path.isdir(log_dir):
        return {}
    last: dict[str, tuple[int, float]] = {}
    for file in sorted(os.listdir(log_dir)):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, file)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                if np.ndim(number) != 0:  # images / histograms
                    continue
                if value.tag not in last or event.step >= last[value.tag][0]:
                    last[value.tag] = (event.step, float(number))
    return {tag: v for tag, (_, v) in sorted(last.items())}


def _evaluate_cell(cfg: BenchConfig, model_file: str, mcfg, detectors: list[str]) -> tuple[dict, dict]:
    model = load_classifier(model_file)
    results = evaluate(model, cfg.id_data, cfg.ood, ["energy"] + [d for d in detectors if d != "energy"],
                       detector_params={"energy": {"temperature": mcfg.temperature}}, resize=cfg.resize,
                       keep_scores=True)
    scores = results["detectors"]["energy"]
    s = results["scores"]["energy"]
    out = {"id_accuracy": results["id_accuracy"], "ood": scores["sets"], "average": scores["average"],
           "convention": results["convention_note"],
           "energy_stats": _energy_stats(model, cfg, mcfg, s["id"], {k: v for k, v in s.items() if k != "id"})}
    if len(detectors) > 0:
        out["detectors"] = {d: {"ood": results["detectors"][d]["sets"], "average": results["detectors"][d]["average"],
                                "hyperparams": results["detectors"][d]["hyperparams"]} for d in detectors}
    return out, s


def run_seconds(model_dir: str) -> float:
    """A finished run's training time: its epochs' seconds summed, as its last checkpoint records them.

    Each process records the epochs it trained, so a run resumed after a kill counts every
    process (timing run_training here would count only the last). Not counted: model building,
    checkpoint writing, evaluation, and a killed process's unfinished epoch (it is redone).
    """
    latest = checkpoint.latest(os.path.join(model_dir, "ckpt"))
    state = read_json(os.path.join(latest, "state.json"), "checkpoint state")
    return round(sum(record["seconds"] for record in state["history"]), 2)


def _run_cell(cfg: BenchConfig, rc: RunConfig | None, directory: str, name: str, seed: int, signature: dict,
              model_file: str, detectors: list[str], train_seconds: float | None, sources: dict) -> dict:
    """Trains (rc given) and evaluates one cell, then writes scores.npz and bench_result.json."""
    if rc is not None:
        _rebase_moved_run(cfg, rc)
        run.run_training(rc)
        train_seconds = run_seconds(rc.model_dir)
    base, _ = split_method(name)
    mcfg = method_config(base, **method_overrides(cfg, name))  # ce: margins only feed its energy statistics
    result, scores = _evaluate_cell(cfg, model_file, mcfg, detectors)
    result.update(method=name, seed=seed, train_seconds=train_seconds,
                  epochs=rc.epochs if rc else None, train_log=_train_log(directory) if rc else {},
                  settings=signature, evaluated_on={"ood": sources, "detectors": list(detectors)})
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "scores.tmp.npz")
    np.savez(tmp, **{f"energy/{k}": v for k, v in scores.items()})
    os.replace(tmp, os.path.join(directory, "scores.npz"))
    write_text_atomic(os.path.join(directory, RESULT_FILE), json.dumps(result, indent=2) + "\n")
    return result


def ood_sources(cfg: BenchConfig) -> dict:
    """What each OOD set's numbers depend on: its directory and, if its images are converted, --resize."""
    shape = read_manifest(cfg.id_data).shape
    return {name: {"dir": os.path.abspath(d), "resize": None if read_manifest(d).shape == shape else cfg.resize}
            for name, d in cfg.ood.items()}


def _cell_plan(cfg: BenchConfig, name: str, seed: int, plan: dict) -> tuple[RunConfig | None, dict, str]:
    """(run config, None for the evaluation-only `ce`; signature; classifier file to evaluate) of a cell."""
    init = init_file(cfg, seed)
    if name == "ce":
        pretrain = None if cfg.init_checkpoint else pretrain_config(cfg, seed, plan["pretrain_epochs"]["used"])
        sig = {"init": _portable(cfg, init), "pretrain": _signature(cfg, pretrain) if pretrain else None,
               "method_flags": method_overrides(cfg, "ce")}
        return None, sig, init
    rc = run_config(cfg, name, seed, plan["finetune_epochs"]["used"], init)
    return rc, _signature(cfg, rc), os.path.join(rc.model_dir, "last.keras")


def _source(src: dict | None) -> str:
    if not src:
        return "an unrecorded directory"
    return src["dir"] + (f" with --resize={src['resize']}" if src["resize"] else "")


def _lacking(cfg: BenchConfig, cell: dict, sources: dict) -> list[str]:
    """The OOD sets (and, for ce, detectors) this run reports that a finished cell was not evaluated on."""
    # cells written before `evaluated_on` was recorded: their sets, assumed from the same directories
    done = cell.get("evaluated_on") or {"ood": {n: sources.get(n) for n in cell["ood"]},
                                        "detectors": list(cell.get("detectors") or {})}
    out = [f"OOD set {n!r}" + (f" from {_source(sources[n])} (it holds {_source(done['ood'][n])})"
                               if n in done["ood"] else "")
           for n in cfg.ood if done["ood"].get(n) != sources[n]]
    if cell["method"] == "ce":
        out += [f"detector {d!r}" for d in cfg.detectors if d not in done["detectors"]]
    return out


def finished_cells(cfg: BenchConfig, plan: dict, sources: dict) -> dict[tuple[str, int], dict]:
    """`{(method, seed): stored result}` of the cells finished with these settings, checked before any work.

    Earlier results are never replaced: a finished cell that lacks an OOD set or detector of
    this run (or holds a set of that name from another directory) is a ConfigError.
    """
    done, problems = {}, []
    for seed in range(cfg.seeds):
        for name in cfg.methods:
            rc, sig, _ = _cell_plan(cfg, name, seed, plan)
            result = _finished(cfg, cell_dir(cfg, name, seed), sig, trained=rc is not None)
            if result is not None:
                done[name, seed] = result
                lacking = _lacking(cfg, result, sources)
                if lacking:
                    problems.append(f"{cell_dir(cfg, name, seed)} lacks {', '.join(lacking)}")
    if problems:
        init = cfg.init_checkpoint or os.path.join(cfg.output, "pretrain", "seed-{seed}", "last.keras")
        raise ConfigError(
            f"--output={cfg.output} holds finished cells that were not evaluated on this run's OOD sets / "
            f"detectors: {'; '.join(problems)}. Earlier results are not replaced: rerun with what they hold "
            f"({_held_flags(list(done.values()))}, or a subset), or use a new --output for other sets "
            f"(--init_checkpoint={init} reuses these pretrained models). Received: ood={cfg.ood}, "
            f"detectors={cfg.detectors}")
    return done


def _held_flags(cells: list[dict]) -> str:
    """The `--ood` / `--detectors` flags every given finished cell was evaluated on."""
    held = [c["evaluated_on"] for c in cells if "evaluated_on" in c]
    if not held:
        return "the --ood sets and --detectors of the run that made them"
    ood = {n: src for n, src in held[0]["ood"].items() if all(h["ood"].get(n) == src for h in held)}
    flags = ["--ood=" + ",".join(f"{n}={src['dir']}" for n, src in ood.items())]
    ce = [c["evaluated_on"]["detectors"] for c in cells if c["method"] == "ce" and "evaluated_on" in c]
    if ce:
        flags.append("--detectors=" + ",".join(d for d in ce[0] if all(d in x for x in ce)))
    resize = {src["resize"] for src in ood.values()} - {None}
    return " ".join(flags + [f"--resize={r}" for r in resize])


def _pretrain(cfg: BenchConfig, seed: int, epochs: int, label: str) -> tuple[str, float | None]:
    """Pretrains seed `seed` (or finds it done); returns (classifier file, train seconds)."""
    if cfg.init_checkpoint:
        return init_checkpoint(cfg, seed), None
    rc = pretrain_config(cfg, seed, epochs)
    marker = os.path.join(rc.model_dir, "pretrain_done.json")
    sig = _signature(cfg, rc)
    if os.path.exists(marker):
        done = read_json(marker, "pretraining marker")
        if _effective(_normalised(cfg, done["settings"])) == sig:
            print(f"{label} ce pretrain seed {seed}: finished earlier, skipped", file=sys.stderr)
            return init_file(cfg, seed), done["train_seconds"]
    print(f"{label} ce pretrain seed {seed}: training {epochs} epochs ...", file=sys.stderr, flush=True)
    _rebase_moved_run(cfg, rc)
    run.run_training(rc)
    seconds = run_seconds(rc.model_dir)
    write_text_atomic(marker, json.dumps({"settings": sig, "train_seconds": seconds}) + "\n")
    print(f"{label} ce pretrain seed {seed}: done ({seconds:.0f} s of training epochs)", file=sys.stderr, flush=True)
    return init_file(cfg, seed), seconds


# ----------------------------------------------------------------------------------------------
# Aggregation and reports


def mean_std(values) -> dict:
    """`{"mean", "std", "n"}`; std is the sample standard deviation (ddof=1), 0 for one value."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def average(sets: dict, names: list[str]) -> dict:
    """Each metric's mean over the OOD sets `names` of `{set: {metric: value}}`."""
    return {m: float(np.mean([sets[n][m] for n in names])) for m in sets[names[0]]}


def current_view(cell: dict, cfg: BenchConfig) -> dict:
    """A stored cell restricted to this run's OOD sets and detectors, its averages over those sets."""
    names = list(cfg.ood)
    view = {**cell, "ood": {n: cell["ood"][n] for n in names}, "average": average(cell["ood"], names)}
    view["energy_stats"] = {**cell["energy_stats"], "ood": {n: cell["energy_stats"]["ood"][n] for n in names}}
    if "detectors" in cell:
        view["detectors"] = {d: {**r, "ood": {n: r["ood"][n] for n in names}, "average": average(r["ood"], names)}
                             for d, r in cell["detectors"].items() if d in cfg.detectors}
    return view


def summarize(cells: list[dict], ood_names: list[str]) -> dict[str, dict]:
    """Mean/std over seeds per table row: `{row: {"fpr95/NAME", "auroc/NAME", "fpr95/average", ...}}`.

    A `ce` cell gives the row `ce+energy-score` and one row `ce+DETECTOR` per detector. The
    average is over `ood_names` only, from the per-set numbers.
    """
    rows: dict[str, list[dict]] = {}
    for cell in cells:
        variants = [(CE_ROW if cell["method"] == "ce" else cell["method"], cell)]
        for det, r in (cell.get("detectors") or {}).items():
            if det != "energy":
                variants.append((f"ce+{det}", {**cell, "ood": r["ood"]}))
        for row, c in variants:
            flat = {"id_accuracy": c["id_accuracy"], "train_seconds": c["train_seconds"]}
            for set_name in ood_names + ["average"]:
                m = average(c["ood"], ood_names) if set_name == "average" else c["ood"][set_name]
                for metric in ("fpr95", "auroc"):
                    flat[f"{metric}/{set_name}"] = m[metric]
            rows.setdefault(row, []).append(flat)
    return {row: {key: mean_std([r[key] for r in rs]) for key in rs[0]} for row, rs in rows.items()}


def _pm(stat: dict, scale: float = 100.0, digits: int = 2) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["n"] == 1:  # no spread to show from one seed
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def machine() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
            f"{'%d GPU(s)' % len(gpus) if gpus else 'no GPU'}, TensorFlow {tf.__version__}, Python "
            f"{platform.python_version()}")


def budget_note(plan: dict) -> str:
    """One line: how `--budget_minutes` scaled the epochs (plan of a bench with a budget)."""
    scaled = any(plan[k]["used"] != plan[k]["requested"] for k in ("pretrain_epochs", "finetune_epochs"))
    return (f"Budget: --budget_minutes={plan['budget_minutes']}: " + (
        f"epochs scaled down to fit (pretrain {plan['pretrain_epochs']['requested']} -> "
        f"{plan['pretrain_epochs']['used']}, fine-tune {plan['finetune_epochs']['requested']} -> "
        f"{plan['finetune_epochs']['used']}; estimate {plan['estimate_seconds']:.0f} s before scaling, "
        f"{plan['estimate_used_seconds']:.0f} s after)." if scaled else "the requested epochs fit; not scaled.")
        + ("" if plan["fits"] else " Even 1 epoch each does not fit the budget: the bench runs over it."))


def markdown(report: dict) -> str:
    """The results table (percentages, mean ± std over seeds) with its conventions and notes."""
    ood_names = list(report["settings"]["ood"])
    plan = report["plan"]
    head = ["method"] + [f"{n} FPR95 ↓ | {n} AUROC ↑" for n in ood_names]
    if len(ood_names) > 1:
        head.append("avg FPR95 ↓ | avg AUROC ↑")
    head += ["ID acc ↑", "train s"]
    lines = ["# kood.bench results", "",
             f"ID: `{report['settings']['id_data']}` (test split); aux: `{report['settings']['aux_data']}`; "
             f"arch {report['settings']['arch']}; {report['seeds_done']} seed(s); "
             + ("mean ± std (sample std) over seeds, " if report["seeds_done"] > 1 else "")
             + "percentages; score: energy (lower = ID).",
             f"{report['convention']}.",
             f"Epochs: pretrain CE {plan['pretrain_epochs']['used']}, fine-tune {plan['finetune_epochs']['used']} "
             f"(lr {report['settings']['lr']} / {report['settings']['finetune_lr']}). "
             "train s: the run's epochs summed (as its checkpoints record them, over every process of a resumed "
             "run; model building, checkpoints and evaluation excluded). Fine-tuned rows' train time excludes the "
             "shared CE pretraining; ce rows show the pretraining time.",
             f"Machine: {report['machine']}."]
    if plan["budget_minutes"] is not None:
        lines.append(budget_note(plan))
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * sum(h.count("|") + 1 for h in head)]
    for row, s in report["summary"].items():
        cells = [row]
        keys = [n for n in ood_names] + (["average"] if len(ood_names) > 1 else [])
        for n in keys:
            cells += [_pm(s[f"fpr95/{n}"]), _pm(s[f"auroc/{n}"])]
        cells += [_pm(s["id_accuracy"]), _pm(s["train_seconds"], 1.0, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + ("\n" + margin_table(report["cells"]) if report.get("cells") else "")


def margin_table(cells: list[dict]) -> str:
    """Energies of each method's final model vs its margins, and the loss masks of its last epoch.

    Shows whether m_in / m_out suit the data: e.g. a CE model whose ID energies all lie far above
    m_in makes the energy loss act on every ID image and the GReg ID penalty on none.
    """
    lines = ["Energies vs margins (final model, mean over seeds; ID = ID test split, aux = first "
             f"{AUX_STATS_LIMIT} auxiliary images). L_S active: fraction of the last epoch's ID / aux training "
             "images inside the energy-loss hinge; the GReg gradient penalty acts on the rest.", "",
             "| method | m_in / m_out | ID energy p5 / p50 / p95 | aux p50 | OOD p50 | ID < m_in | aux > m_out | "
             "L_S active ID / aux |", "|---|---|---|---|---|---|---|---|"]
    by_method: dict[str, list[dict]] = {}
    for cell in cells:
        by_method.setdefault(cell["method"], []).append(cell)
    for name, cs in by_method.items():
        stats = [c["energy_stats"] for c in cs]
        mean = lambda get: float(np.mean([get(e) for e in stats]))  # noqa: E731
        has_aux = all("aux" in e for e in stats)
        logs = [c["train_log"] for c in cs]
        active = (" / ".join(f"{np.mean([g[k] for g in logs]):.2f}" for k in ("energy_active_id", "energy_active_aux"))
                  if all("energy_active_id" in g for g in logs) else "-")
        row = [CE_ROW if name == "ce" else name, f"{stats[0]['m_in']:g} / {stats[0]['m_out']:g}",
               " / ".join(f"{mean(lambda e: e['id'][q]):.1f}" for q in ("p5", "p50", "p95")),
               f"{mean(lambda e: e['aux']['p50']):.1f}" if has_aux else "-",
               ", ".join(f"{k} {mean(lambda e: e['ood'][k]['p50']):.1f}" for k in stats[0]["ood"]),
               f"{mean(lambda e: e['id_below_m_in']):.2f}",
               f"{mean(lambda e: e['aux']['above_m_out']):.2f}" if has_aux else "-", active]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_plots(cfg: BenchConfig, rows: list[str]) -> list[str]:
    """Energy histograms (ID vs each OOD set) per method and ROC curves per OOD set, lowest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    scores = {}
    for name in rows:
        for seed in range(cfg.seeds):
            path = os.path.join(cell_dir(cfg, name, seed), "scores.npz")
            if os.path.exists(path):
                with np.load(path) as f:  # the cell may hold more OOD sets than this run reports
                    scores[name] = {k.split("/", 1)[1]: f[k] for k in f.files
                                    if k.split("/", 1)[1] in ["id", *cfg.ood]}
                break
    if not scores:
        return []
    out_dir = os.path.join(cfg.output, "plots")
    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 2.8), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        lo, hi = np.percentile(np.concatenate(list(s.values())), [0.5, 99.5])
        bins = np.linspace(lo, hi, 50)
        for set_name, v in s.items():
            ax.hist(v, bins=bins, alpha=0.5, density=True, label="ID test" if set_name == "id" else set_name)
        ax.set_title(CE_ROW if name == "ce" else name, fontsize=9)
        ax.set_xlabel("energy (lower = ID)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "energy_hist.png"), os.path.join(out_dir, "roc.png")]
    fig.savefig(paths[0] + ".tmp.png", dpi=90)
    plt.close(fig)
    ood_names = list(cfg.ood)
    fig, axes = plt.subplots(1, len(ood_names), figsize=(3.6 * len(ood_names), 3.4), squeeze=False)
    for ax, set_name in zip(axes[0], ood_names):
        for name, s in scores.items():
            y = np.r_[np.zeros(len(s["id"])), np.ones(len(s[set_name]))]
            fpr, tpr, _ = roc_curve(y, np.r_[s["id"], s[set_name]])
            ax.plot(fpr, tpr, label=CE_ROW if name == "ce" else name)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"ROC, OOD = {set_name} (positive)", fontsize=9)
        ax.set_xlabel("ID flagged as OOD", fontsize=8)
        ax.set_ylabel("OOD detected", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1] + ".tmp.png", dpi=90)
    plt.close(fig)
    for p in paths:
        os.replace(p + ".tmp.png", p)
    return paths


# ----------------------------------------------------------------------------------------------
# The bench


def run_bench(cfg: BenchConfig, started: float | None = None) -> dict:
    """Runs (or resumes) every (method, seed) cell and writes the reports; returns results.json's content.

    `started`: the `time.perf_counter()` value `budget_minutes` counts from (default: this call; the CLI
    gives its command's start). A module-level clock would count a notebook's or a sweep script's earlier
    work (e.g. a previous bench) against the budget.

    Example:
        report = run_bench(BenchConfig(id_data="d/id", aux_data="d/aux", ood={"o": "d/ood"}, output="out"))
        print(report["summary"]["greg"]["fpr95/average"])
    """
    started = time.perf_counter() if started is None else started
    validate(cfg)
    with lock_output(cfg):
        return _run_cells(cfg, started)


def lock_output(cfg: BenchConfig):
    """Holds `cfg.output` for the block: a second bench into it (both would train and report the same runs at
    once) is refused."""
    return locked_output(cfg.output, "--output", activity="running a bench into this --output",
                         advice="wait for it or stop it (rerunning the same command then resumes the bench), or "
                                "use another --output. Two benches in one --output would train the same runs at once")


def _run_cells(cfg: BenchConfig, started: float) -> dict:
    """`run_bench` with `cfg.output` locked."""
    plan = _load_or_make_plan(cfg, started)
    if plan["budget_minutes"] is not None:
        print(budget_note(plan), file=sys.stderr, flush=True)
    sources = ood_sources(cfg)
    check_started_runs(cfg, plan)
    finished = finished_cells(cfg, plan, sources)
    pre_epochs, fine_epochs = plan["pretrain_epochs"]["used"], plan["finetune_epochs"]["used"]
    per_seed = len(cfg.methods) + (0 if cfg.init_checkpoint else 1)
    total, k = cfg.seeds * per_seed, 0
    cells = []
    bench_start = time.time()
    for seed in range(cfg.seeds):
        if not cfg.init_checkpoint:
            k += 1
        _, pre_seconds = _pretrain(cfg, seed, pre_epochs, f"[{k}/{total}]")
        for name in cfg.methods:
            k += 1
            label = f"[{k}/{total}] {name} seed {seed}"
            if (name, seed) in finished:
                print(f"{label}: finished earlier, skipped", file=sys.stderr)
                cells.append(current_view(finished[name, seed], cfg))
                continue
            rc, sig, model_file = _cell_plan(cfg, name, seed, plan)
            print(f"{label}: {'evaluating' if rc is None else f'training {fine_epochs} epochs'} ...",
                  file=sys.stderr, flush=True)
            start = time.time()
            cells.append(_run_cell(cfg, rc, cell_dir(cfg, name, seed), name, seed, sig, model_file,
                                   list(cfg.detectors) if name == "ce" else [], pre_seconds, sources))
            print(f"{label}: done in {time.time() - start:.0f} s (FPR95 avg {cells[-1]['average']['fpr95']:.4f}, "
                  f"AUROC avg {cells[-1]['average']['auroc']:.4f})", file=sys.stderr, flush=True)
    report = {
        "settings": json.loads(json.dumps(dataclasses.asdict(cfg))), "plan": plan, "machine": machine(),
        "convention": cells[0]["convention"], "seeds_done": cfg.seeds,
        "summary": summarize(cells, list(cfg.ood)),
        "cells": cells, "wall_seconds_this_run": round(time.time() - bench_start, 1)}
    report["plots"] = write_plots(cfg, cfg.methods)
    write_text_atomic(os.path.join(cfg.output, "results.md"), markdown(report))
    write_text_atomic(os.path.join(cfg.output, "results.json"), json_text(report))
    return report


# ----------------------------------------------------------------------------------------------
# CLI


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("id_data", None, "ID kood dataset dir (train and test splits).")
    flags.DEFINE_string("aux_data", None, "Auxiliary outlier kood dataset dir (energy/greg/greg_plus training).")
    flags.DEFINE_string("syn_data", None, "Synthetic ID kood dataset dir (for METHOD+sio).")
    flags.DEFINE_string("ood", None, "Held-out OOD sets: name=DIR[,name=DIR].")
    flags.DEFINE_alias("ood_data", "ood")  # kood.train's name for the same thing
    flags.DEFINE_list("methods", ["ce", "energy", "greg", "greg_plus"],
                      "Methods: ce (the pretrained CE model, energy score), any kood.methods preset, "
                      "or PRESET+sio (with --syn_data, --sio_ratio).")
    flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1 (mean ± std over seeds).")
    flags.DEFINE_string("arch", "small_cnn", "Architecture (kood.models.ARCHITECTURES).")
    flags.DEFINE_string("arch_kwargs", "", "Architecture options key=value[,key=value], e.g. width=32.")
    flags.DEFINE_integer("pretrain_epochs", 10, "CE pretraining epochs per seed.")
    flags.DEFINE_integer("finetune_epochs", 5, "Fine-tuning epochs of every method (the same budget).")
    flags.DEFINE_string("init_checkpoint", None, "Fine-tune from this classifier instead of pretraining; {seed} in "
                        "the path is replaced by the seed, e.g. OTHER_BENCH/pretrain/seed-{seed}/last.keras.")
    flags.DEFINE_list("detectors", [], "Post-hoc detectors (kood.detectors) applied to the ce baseline.")
    flags.DEFINE_enum("resize", "error", list(data.RESIZE_MODES), "How to feed --ood sets whose image size or "
                      "channels differ from the ID set: error (default), resize (bilinear) or center_crop.")
    flags.DEFINE_float("budget_minutes", None, "Scale epochs down (never up) so the whole bench fits.")
    flags.DEFINE_boolean("speed", False, "Only measure step time and pipeline throughput per method vs CE.")
    flags.DEFINE_integer("speed_steps", 20, "--speed: steps per timing.")
    flags.DEFINE_integer("speed_reps", 5, "--speed: interleaved repetitions.")
    flags.DEFINE_integer("speed_pipeline_batches", 100, "--speed: input batches per pipeline timing.")
    flags.DEFINE_string("output", None, "Output directory (resumable: a rerun skips finished cells).")
    flags.DEFINE_integer("batch_size", 64, "ID batch size.")
    flags.DEFINE_float("lr", 0.1, "Peak learning rate of CE pretraining (cosine schedule).")
    flags.DEFINE_float("finetune_lr", 0.01, "Peak learning rate of fine-tuning (cosine schedule).")
    flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "Optimizer.")
    flags.DEFINE_float("weight_decay", 5e-4, "Weight decay.")
    flags.DEFINE_boolean("augment", True, "Random crop + horizontal flip on ID and aux images.")
    flags.DEFINE_float("sio_ratio", 0.8, "Real fraction of each batch in METHOD+sio runs.")
    flags.DEFINE_integer("steps_per_epoch", 0, "Override steps per epoch (0 = ID train images // batch).")
    flags.DEFINE_enum("precision", "float32", PRECISIONS, "kood.train --precision of every run.")
    flags.DEFINE_string("method_flags", "",
                        "Method hyperparameter overrides: METHOD:key=value[,key=value][;METHOD:...]; METHOD may "
                        "be * (every method) or a base name (also its +sio variant), e.g. '*:m_in=-12,m_out=-5'.")
    flags.DEFINE_integer("verbose", 0, "Keras progress output of the training runs (0 silent, 1 progress bar, 2 one "
                         "line/epoch).")


def config_from_flags(values) -> BenchConfig:
    for name in ("id_data", "ood", "output"):
        if not values[name].value:
            raise ConfigError(f"--{name} is required")
    return BenchConfig(
        id_data=values.id_data, aux_data=values.aux_data, syn_data=values.syn_data, ood=parse_ood(values.ood),
        output=values.output, methods=list(values.methods), seeds=values.seeds, arch=values.arch,
        arch_kwargs=parse_key_values(values.arch_kwargs, "arch_kwargs"), pretrain_epochs=values.pretrain_epochs,
        finetune_epochs=values.finetune_epochs, init_checkpoint=values.init_checkpoint,
        detectors=list(values.detectors), resize=values.resize, budget_minutes=values.budget_minutes,
        batch_size=values.batch_size, lr=values.lr, finetune_lr=values.finetune_lr, optimizer=values.optimizer,
        weight_decay=values.weight_decay, augment=values.augment, sio_ratio=values.sio_ratio,
        steps_per_epoch=values.steps_per_epoch, precision=values.precision,
        method_flags=parse_method_flags(values.method_flags), verbose=values.verbose)


def run_from_flags(values) -> dict:
    """Runs the bench (or `--speed`) from parsed flags and prints the table."""
    cfg = config_from_flags(values)
    if values.speed:
        speed = run_speed(cfg, values.speed_steps, values.speed_reps, values.speed_pipeline_batches)
        print(speed_markdown(speed))
        print(f"wrote {os.path.join(cfg.output, 'speed.md')} and speed.json", file=sys.stderr)
        return speed
    report = run_bench(cfg, started=STARTED)
    print(markdown(report))
    print(f"wrote {cfg.output}/results.md, results.json, plots/", file=sys.stderr)
    return report


def main(argv) -> None:
    from absl import flags

    from kood.errors import run_cli

    tf.get_logger().setLevel("ERROR")  # tf.function retracing notes of every new model: noise here
    run_cli("kood.bench", argv, lambda: run_from_flags(flags.FLAGS))


if __name__ == "__main__":
    define_flags()
    run_app(main)
