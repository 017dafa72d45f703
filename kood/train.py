r"""Train an OOD-aware classifier: `python -m kood.train --method=greg`.

With no data flags it runs the embedded demo end to end (builds the demo data
from scikit-learn's digits if missing, trains a small CNN, evaluates on the
held-out OOD set). With data:

  python -m kood.train --method=greg_plus --id_data=DIR --aux_data=DIR \
      [--syn_data=DIR --sio_ratio=0.8] --arch=resnet18 --model_dir=DIR

Presets (`--method`) only set the method flags below (`--score_loss`,
`--energy_weight`, `--m_in`, ...); a flag given explicitly wins over the preset.
Experiments are flagfiles: `python -m kood.train --flagfile=flags/cifar10_resnet18_greg.cfg`.
Rerunning the same command resumes from the last checkpoint in --model_dir.

Several GPUs, machines or a TPU: `--strategy=mirrored|multi_worker|tpu` (docs/distributed.md).
--batch_size is GLOBAL (split over the replicas), so results do not depend on the device count.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys

import tensorflow as tf
from absl import app, flags

from kood.distribute import STRATEGIES
from kood.errors import ConfigError, DataError, interruption, parse_key_values, quiet_info_logs, run_app
from kood.methods import GRAD_SPACES, METHODS, POOL_DTYPES, SAMPLERS, SCORE_LOSSES, MethodConfig
from kood.models import ARCHITECTURES, PRECISIONS
from kood.run import OPTIMIZERS, SCHEDULES, RunConfig, validate

_D = MethodConfig()  # preset-free defaults, shown in --help

# The embedded demo's defaults, applied only to flags the user did not set. No flips: a mirrored digit is
# another shape (README, --augment).
DEMO_DEFAULTS = dict(epochs=30, batch_size=32, lr=0.05, weight_decay=5e-4, log_every=5, augment=False)

# Method flags: None means "take the --method preset's value".
flags.DEFINE_enum("method", "greg", sorted(METHODS), "Training method preset (sets the method flags below).")
flags.DEFINE_enum("score_loss", None, SCORE_LOSSES, "Auxiliary loss: none | oe | energy. Preset-dependent.")
flags.DEFINE_float("energy_weight", None, f"lambda_S, weight of the energy loss (default {_D.energy_weight}).")
flags.DEFINE_float("oe_weight", None, f"Weight of the outlier-exposure loss (default {_D.oe_weight}).")
flags.DEFINE_float("m_in", None, f"ID energy margin m_in (default {_D.m_in}, the GReg code's value).")
flags.DEFINE_float("m_out", None, f"Outlier energy margin m_out (default {_D.m_out}).")
flags.DEFINE_float("grad_weight", None, "lambda_grad of the GReg input-gradient penalty (greg presets: 1.0, else 0).")
flags.DEFINE_enum("grad_space", None, GRAD_SPACES,
                  "Input space of the gradient norm: normalized (paper, default) or pixel (0..255).")
flags.DEFINE_enum("sampler", None, SAMPLERS, "Auxiliary sampler: random | energy_cluster (GReg+).")
flags.DEFINE_integer("cluster_k", None, f"GReg+ K-means clusters, min(k, batch_size) (default {_D.cluster_k}).")
flags.DEFINE_string("pool_factor", None, f"GReg+ candidate pool = round(pool_factor x batch_size) (default "
                   f"{_D.pool_factor:g}: CIFAR with 300K RandomImages), or auto: the paper's rule N_aux / N_id "
                   f"(train splits of --aux_data and --id_data, at least 2), which the run's header shows.")
flags.DEFINE_boolean("two_way", None, "GReg+: take the lowest- AND highest-energy sample per cluster (default true).")
flags.DEFINE_integer("kmeans_iters", None, f"Lloyd iterations of the in-graph K-means (default {_D.kmeans_iters}).")
flags.DEFINE_enum("pool_dtype", None, POOL_DTYPES,
                  "GReg+: compute dtype of the candidate-pool forward (default float32, the paper; bfloat16 / "
                  "float16 are ~2x faster on hardware with them, see docs/performance.md).")
flags.DEFINE_float("aux_batch_factor", None, "Random sampler: aux batch = factor x batch_size (default 1).")
flags.DEFINE_float("temperature", None, "Temperature T of the energy score (default 1).")
METHOD_FLAGS = [f.name for f in dataclasses.fields(MethodConfig)]

# Data.
flags.DEFINE_string("id_data", None, "In-distribution kood dataset dir (splits train and test/val). "
                    "Unset: run the embedded demo (--demo_dir), whose defaults differ: "
                    + ", ".join(f"{k}={v}" for k, v in DEMO_DEFAULTS.items()) + " (flags given explicitly win).")
flags.DEFINE_string("aux_data", None, "Auxiliary outlier kood dataset dir (oe, energy, greg, greg_plus, ...).")
flags.DEFINE_string("syn_data", None, "Synthetic ID kood dataset dir for SIO (needs --sio_ratio < 1).")
flags.DEFINE_float("sio_ratio", 1.0, "SIO alpha: real fraction of every ID batch, in (0, 1]; 1 = no synthetic data.")
flags.DEFINE_list("ood_data", [], "Held-out OOD sets evaluated at the end: name=DIR,name=DIR.")
flags.DEFINE_string("demo_dir", os.path.join(os.path.expanduser("~"), ".cache", "kood", "demo"),
                    "Where the embedded demo data is built when --id_data is unset.")
flags.DEFINE_boolean("augment", True, "Random crop (4-pixel padding) + horizontal flip on ID and aux images.")



def arch_help() -> str:
    """--arch's help, listing the registry itself: a hand-written list missed architectures added to it."""
    return (f"Architecture: {', '.join(ARCHITECTURES)} (kood.models.ARCHITECTURES; options: --arch_kwargs). "
            "small_cnn is CPU-friendly, resnet18 the CIFAR variant, densenet121 from keras.applications.")


# Model and optimization.
flags.DEFINE_string("arch", "small_cnn", arch_help())
flags.DEFINE_list("arch_kwargs", [], "Architecture options key=value, e.g. width=32,depth=2.")
flags.DEFINE_string("init_checkpoint", None, "Fine-tune from this .keras file or model dir (strict: every weight must load).")
flags.DEFINE_enum("optimizer", "sgd", OPTIMIZERS, "Optimizer.")
flags.DEFINE_float("lr", 0.1, "Peak learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (--optimizer=sgd only).")
flags.DEFINE_boolean("nesterov", True, "SGD Nesterov momentum (--optimizer=sgd only).")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay (Keras optimizer weight_decay; 0 = off).")
flags.DEFINE_enum("schedule", "cosine", SCHEDULES, "Learning-rate schedule over all steps.")
flags.DEFINE_float("min_lr", 0.0, "Cosine schedule floor.")
flags.DEFINE_list("lr_milestones", [], "Multistep: epochs after which the lr is multiplied by --lr_gamma "
                  "(increasing, 1 .. --epochs - 1).")
flags.DEFINE_float("lr_gamma", 0.1, "Multistep decay factor.")
flags.DEFINE_integer("epochs", 10, "Epochs (an epoch = every real ID train image seen once).")
flags.DEFINE_integer("steps_per_epoch", 0, "Override steps per epoch (0 = real train images // real images per batch).")
flags.DEFINE_integer("batch_size", 64, "GLOBAL ID batch size B, split evenly over the replicas of --strategy "
                     "(must be divisible by their number). Aux batch: B x aux_batch_factor, or pool_factor x B "
                     "for GReg+ (each replica's sampler picks 2 x B/replicas from its own B/replicas x pool_factor).")
flags.DEFINE_integer("seed", 0, "Random seed (weights, data order, sampler).")
flags.DEFINE_boolean("deterministic", False, "Enable TF op determinism (bit-exact reruns and resumes; slower).")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the train step (slower on CPU; Keras turns it off, with a "
                     "warning, under --deterministic).")
flags.DEFINE_enum("precision", "float32", PRECISIONS,
                  "float32, or mixed_bfloat16: the architecture computes in bfloat16 (float32 weights, BatchNorm "
                  "statistics, input normalization, features and logits) on GPUs from Ampere, TPUs and AVX512-BF16 "
                  "CPUs. The GReg+ pool forward follows --pool_dtype (add --pool_dtype=bfloat16). float16 is not "
                  "offered: it needs loss scaling, and the GReg penalty's inner gradient (of a batch mean, ~1/B "
                  "per sample) its own scale, which kood does not implement.")

# Distribution (docs/distributed.md).
flags.DEFINE_enum("strategy", "auto", STRATEGIES,
                  "tf.distribute strategy: auto (mirrored if >1 GPU, else one device), one_device, mirrored (all "
                  "local GPUs, else all logical CPUs), multi_worker (several machines, reads TF_CONFIG; only the "
                  "chief writes --model_dir, which must be shared storage), tpu (see --tpu).")
flags.DEFINE_string("tpu", "", "--strategy=tpu: TPU name or grpc:// address for TPUClusterResolver ('' = local).")
flags.DEFINE_boolean("sync_batchnorm", False, "BatchNorm statistics over the global batch (all replicas) instead of "
                     "each replica's B/replicas images; costs two all-reduces per BatchNorm layer and step.")
flags.DEFINE_integer("cpu_devices", 0, "Split the host CPU into this many logical devices (0 = off), so "
                     "--strategy=mirrored can be tried without GPUs. Testing aid: it does not add compute.")

# Run.
flags.DEFINE_string("model_dir", None, "Run directory (checkpoints, logs, results). Default: kood_runs/<method>[-demo].")
flags.DEFINE_string("val_split", "auto", "ID split that picks best.keras (else best.keras = the last epoch): auto "
                    "(val or validation; a test split is only monitored, never used to pick), a split name, or none.")
flags.DEFINE_integer("log_every", 10, "Write step scalars to TensorBoard every N steps.")
flags.DEFINE_integer("verbose", 1, "Keras progress output: 0 silent (also kood's notes), 1 progress bar, 2 one "
                     "line per epoch.")

FLAGS = flags.FLAGS


def _milestones(values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(m) for m in values)
    except ValueError:
        raise ConfigError(f"--lr_milestones: epochs must be whole numbers. Received: {','.join(values)}") from None


def config_from_flags() -> RunConfig:
    overrides = {name: FLAGS[name].value for name in METHOD_FLAGS if FLAGS[name].present}
    if "pool_factor" in overrides and overrides["pool_factor"] != "auto":
        try:
            overrides["pool_factor"] = float(overrides["pool_factor"])
        except ValueError:
            raise ConfigError(f"--pool_factor must be a number or auto. Received: pool_factor="
                              f"{overrides['pool_factor']!r}") from None
    values = {name: FLAGS[name].value for name in (
        "sio_ratio", "arch", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "min_lr",
        "lr_gamma", "epochs", "steps_per_epoch", "batch_size", "augment", "seed", "init_checkpoint", "val_split",
        "log_every", "deterministic", "jit_compile", "precision", "verbose", "aux_data", "syn_data", "strategy", "tpu",
        "sync_batchnorm")}
    sgd_only = [f"--{name}" for name in ("momentum", "nesterov") if FLAGS[name].present]
    if FLAGS.optimizer != "sgd" and sgd_only:  # often set by a flagfile that another --optimizer overrides
        print(f"note: {'/'.join(sgd_only)} {'apply' if len(sgd_only) > 1 else 'applies'} to --optimizer=sgd only; "
              f"not used with --optimizer={FLAGS.optimizer}", file=sys.stderr)
    ood = parse_key_values(FLAGS.ood_data, "ood_data", typed=False)
    id_data = FLAGS.id_data
    suffix = ""
    if id_data is None:
        if FLAGS.aux_data or FLAGS.syn_data or ood:
            raise ConfigError("--aux_data/--syn_data/--ood_data need --id_data (without it kood runs the demo)")
        dirs = _demo_dirs(FLAGS.demo_dir)
        id_data, ood, suffix = dirs["id"], {"demo_ood": dirs["ood"]}, "-demo"
        values["aux_data"] = dirs["aux"]
        if values["sio_ratio"] < 1.0:
            values["syn_data"] = dirs["syn"]
        for name, value in DEMO_DEFAULTS.items():
            if not FLAGS[name].present:
                values[name] = value
        print(f"No --id_data: running the embedded demo on {FLAGS.demo_dir} "
              f"(digits; aux and OOD are disjoint digit classes)", file=sys.stderr)
    cfg = RunConfig(
        model_dir=FLAGS.model_dir or os.path.join("kood_runs", f"{FLAGS.method}{suffix}"),
        id_data=id_data, method=FLAGS.method, method_overrides=overrides, ood_data=ood,
        arch_kwargs=parse_key_values(FLAGS.arch_kwargs, "arch_kwargs"),
        lr_milestones=_milestones(FLAGS.lr_milestones), **values)
    if suffix and not _demo_ready(FLAGS.demo_dir):
        from kood.demo_data import build_demo

        validate(cfg)  # a bad flag is reported before the demo data is built
        # Missing or partial (e.g. one role deleted): rebuild them all; the build is deterministic.
        build_demo(FLAGS.demo_dir, overwrite=True)
    return cfg


def _demo_dirs(root: str) -> dict[str, str]:
    return {role: os.path.join(root, role) for role in ("id", "aux", "ood", "syn")}


def _demo_ready(root: str) -> bool:
    return all(os.path.exists(os.path.join(d, "manifest.json")) for d in _demo_dirs(root).values())


def split_cpu(count: int) -> None:
    """Splits the first CPU into `count` logical devices; must run before TensorFlow initializes."""
    if count < 1:
        raise ConfigError(f"--cpu_devices must be >= 1 (0 = off). Received: cpu_devices={count}")
    try:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as e:  # TensorFlow already initialized its devices
        raise ConfigError(f"--cpu_devices={count}: {e}") from e


# A full disk, a read-only or foreign directory: the user's to fix, not a bug to show a traceback for.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kood.run import format_results, run_training
    from kood.verify import explain_read_error, is_read_error

    quiet_info_logs()
    cfg = None
    try:
        if FLAGS.cpu_devices:
            split_cpu(FLAGS.cpu_devices)
        cfg = config_from_flags()
        results = run_training(cfg)
    except (ConfigError, DataError, FloatingPointError) as e:
        print(f"kood.train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how, code = interruption(e)
        resume = (f": rerun the same command to resume from the last checkpoint in {cfg.model_dir} (written at the "
                  f"end of every epoch; the interrupted epoch starts over)" if cfg else "")
        print(f"kood.train: interrupted ({how}){resume}", file=sys.stderr)
        return code
    except OSError as e:
        if e.errno not in WRITE_ERRNOS or cfg is None:
            raise
        path = str(e.filename or cfg.model_dir)
        ours = os.path.abspath(path).startswith(os.path.abspath(cfg.model_dir))
        hint = (f": free space or fix the permissions of --model_dir={cfg.model_dir} (or pass another), then rerun "
                f"the same command to resume" if ours else "")
        print(f"kood.train: error: {path}: {e.strerror}{hint}", file=sys.stderr)
        return 2
    except tf.errors.UnavailableError as e:  # multi-worker: a peer died (no heartbeat) or is unreachable
        print(f"kood.train: error: lost another worker of the run ({e.message.splitlines()[0]}). Rerun the same "
              f"command on every worker: the run resumes from the last checkpoint in --model_dir.", file=sys.stderr)
        return 3
    except Exception as e:
        if not is_read_error(e) or cfg is None:
            raise
        error = explain_read_error(e, [cfg.id_data, cfg.aux_data, cfg.syn_data, *cfg.ood_data.values()])
        print(f"kood.train: error: {error}", file=sys.stderr)
        return 2
    if not results["chief"]:  # one report per run: the chief's (the others wrote into a temporary dir)
        print(f"Worker done; the run's model and results are the chief's: {cfg.model_dir}/best.keras, "
              f"{cfg.model_dir}/results.json")
        return 0
    print(format_results(results))
    own = "; the metrics above are its own" if "id_accuracy" in results else ""
    print(f"Model: {os.path.join(cfg.model_dir, 'best.keras')} (epoch {results['checkpoint_epoch']} of "
          f"{results['epochs']}{own})")
    print(f"TensorBoard: {results['tensorboard']}")
    return 0


if __name__ == "__main__":
    run_app(main)
