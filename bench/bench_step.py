"""Train-step time of ce, energy, greg and greg_plus (issue #3 "Benchmark"), and where the time goes.

Each method runs `kood.trainer.OODTrainer.train_step` exactly as `kood.run` trains: `compile` with SGD
(momentum 0.9), then the compiled Keras train function (`trainer.make_train_function()`) on an
iterator over a repeated in-memory batch (`Dataset.from_tensors(...).repeat()`, so no input
pipeline is measured). ID batch B = 64 of 32x32x3 made-up images; auxiliary batch as the trainer
asks for it (`trainer.aux_batch_size(B)`: B for energy/greg, the 6 x B pool for greg_plus, which
then trains on the 2 x B it selects). Timing: after warm-up, `--reps` rounds; in each round every
method runs `--steps` steps, the methods in a fresh random order, so noise from other processes on
the machine hits all of them alike. Reported: the median over rounds of ms/step.

`--parts` also times the pieces of a step separately (each its own tf.function, same model):
forward (training mode, [ID; aux]), forward + backward (the energy step's gradient), forward +
double backprop (the greg step's gradient), the GReg+ pool forward (inference mode, 6 x B) and
the sampler (L2-normalize + k-means + per-cluster pick) on the pool's features.

Usage:
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_step.py [--archs=small_cnn,wrn40_2] [--reps=7] [--steps=5]
        [--parts] [--jit_compile] [--extra=greg_aux2,greg_plus_bf16] [--trace_dir=/tmp/trace] [--bn=fused,keras]
        [--precision=mixed_bfloat16]
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from kood import losses, sampling  # noqa: E402
from kood.errors import parse_key_values, run_app  # noqa: E402
from kood.methods import method_config  # noqa: E402
from kood.models import PRECISIONS, build_classifier  # noqa: E402
from kood.models.layers import use_batchnorm  # noqa: E402
from kood.trainer import OODTrainer  # noqa: E402

flags.DEFINE_list("archs", ["small_cnn", "wrn40_2"], "Architectures (kood.models registry).")
flags.DEFINE_list("arch_kwargs", [], "Architecture options key=value for every --archs entry, e.g. width=32 "
                  "(as kood.train --arch_kwargs).")
flags.DEFINE_list("methods", ["ce", "energy", "greg", "greg_plus"], "Methods (kood.methods presets).")
flags.DEFINE_list("extra", [], "Extra variants: greg_aux2 (greg with a 2 x B random auxiliary batch, the same "
                  "number of trained outliers as greg_plus), greg_plus_bf16 (greg_plus with --pool_dtype=bfloat16).")
flags.DEFINE_list("bn", ["fused"], "BatchNorm of the architectures: fused (kood.models.layers.FusedBatchNorm, the "
                  "default), keras (keras.layers.BatchNormalization), or both (fused,keras: each method runs with "
                  "each, interleaved in the same rounds, named method[bn]).")
flags.DEFINE_integer("batch_size", 64, "ID batch size B.")
flags.DEFINE_integer("reps", 7, "Timed rounds (the median is reported).")
flags.DEFINE_integer("steps", 5, "Steps per method per round.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per method before the first round (after tracing).")
flags.DEFINE_boolean("parts", False, "Also time the parts of a step (forward, backprop, pool, sampler).")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the train step (trainer.compile(jit_compile=True)).")
flags.DEFINE_string("trace_dir", "", "If set, write a tf.profiler trace of a few steps per method here "
                    "(open with TensorBoard's profile plugin).")
flags.DEFINE_enum("precision", "float32", PRECISIONS,
                  "Architecture precision (kood.train --precision).")
flags.DEFINE_integer("threads", 0, "TF intra-op threads (0 = TF default).")
flags.DEFINE_integer("inter_threads", 0, "TF inter-op threads (0 = TF default).")
FLAGS = flags.FLAGS

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
VARIANTS = {"greg_aux2": ("greg", dict(aux_batch_factor=2.0)),
            "greg_plus_bf16": ("greg_plus", dict(pool_dtype="bfloat16"))}


def _make_trainer(arch: str, method: str, batch_size: int, rng: np.random.Generator, bn: str = "fused"):
    """A compiled OODTrainer and its compiled train function + a data iterator (in-memory batch)."""
    preset, overrides = VARIANTS.get(method, (method, {}))
    keras.utils.set_random_seed(0)
    with use_batchnorm(bn):
        classifier = build_classifier(arch, input_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                                      mean=[125.0] * 3, std=[63.0] * 3, precision=FLAGS.precision,
                                      **parse_key_values(FLAGS.arch_kwargs, "arch_kwargs"))
    trainer = OODTrainer(classifier, method_config(preset, **overrides), seed=0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=FLAGS.jit_compile)
    x_id = rng.integers(0, 256, (batch_size, *IMAGE_SHAPE)).astype(np.float32)
    y_id = (np.arange(batch_size) % NUM_CLASSES).astype(np.int64)
    if trainer.config.uses_aux:
        x_aux = rng.integers(0, 256, (trainer.aux_batch_size(batch_size), *IMAGE_SHAPE)).astype(np.float32)
        batch = ((x_id, y_id), x_aux)
    else:
        batch = (x_id, y_id)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    # fit() builds the optimizer before the first step; do the same outside the tf.function.
    trainer.optimizer.build(trainer.trainable_variables)
    trainer.make_train_function()
    return trainer, lambda: _block(trainer.train_function(iterator))


def _block(outputs):
    """Wait for the step to finish (fetch one metric value)."""
    if hasattr(outputs, "get_value"):  # Keras wraps the outputs in a tf.experimental.Optional
        outputs = outputs.get_value()
    return float(outputs["loss"])


def time_steps(runners: dict, reps: int, steps: int) -> dict[str, list[float]]:
    """ms/step of each runner per round, methods in a fresh random order each round."""
    per_round = {name: [] for name in runners}
    order = list(runners)
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            for _ in range(steps):
                runners[name]()
            per_round[name].append(1e3 * (time.perf_counter() - start) / steps)
    return per_round


def part_functions(trainer: OODTrainer, batch_size: int, rng: np.random.Generator) -> dict:
    """tf.functions timing the pieces of a GReg / GReg+ step on `trainer`'s model."""
    cfg = trainer.config
    net, normalize = trainer.net, trainer.normalize
    variables = trainer.classifier.trainable_variables
    x2 = tf.constant(rng.integers(0, 256, (2 * batch_size, *IMAGE_SHAPE)).astype(np.float32))
    x3 = tf.constant(rng.integers(0, 256, (3 * batch_size, *IMAGE_SHAPE)).astype(np.float32))
    pool = tf.constant(rng.integers(0, 256, (int(round(cfg.pool_factor * batch_size)), *IMAGE_SHAPE)).astype(np.float32))
    b = batch_size

    def energies(x, training):
        return losses.energy_score(net(normalize(x), training=training)["logits"])

    @tf.function
    def forward(x):
        return tf.reduce_sum(energies(x, True))

    @tf.function
    def backprop(x):
        with tf.GradientTape() as tape:
            s = energies(x, True)
            loss = losses.energy_loss(s[:b], s[b:], cfg.m_in, cfg.m_out)
        return tf.linalg.global_norm(tape.gradient(loss, variables))

    @tf.function
    def double_backprop(x):
        with tf.GradientTape() as tape:
            res = losses.score_gradient_penalty(net, normalize(x), b, cfg.m_in, cfg.m_out)
            loss = losses.energy_loss(res["energies"][:b], res["energies"][b:], cfg.m_in, cfg.m_out) + res["penalty"]
        return tf.linalg.global_norm(tape.gradient(loss, variables))

    @tf.function
    def pool_forward(x):
        out = net(normalize(x), training=False)
        return out["features"], losses.energy_score(out["logits"])

    features, pool_energies = pool_forward(pool)

    @tf.function
    def sampler(seed):
        return sampling.energy_cluster_sample(features, pool_energies, num_select=2 * b,
                                              num_clusters=min(cfg.cluster_k, b), iters=cfg.kmeans_iters,
                                              seed=seed)

    step = iter(range(10 ** 9))
    return {
        "forward, training, 2B": lambda: float(forward(x2)),
        "forward+backprop, 2B (energy)": lambda: float(backprop(x2)),
        "forward+double backprop, 2B (greg)": lambda: float(double_backprop(x2)),
        "forward+double backprop, 3B (greg_plus)": lambda: float(double_backprop(x3)),
        f"pool forward, inference, {cfg.pool_factor:g}B": lambda: float(tf.reduce_sum(pool_forward(pool)[1])),
        f"sampler: k-means (k={min(cfg.cluster_k, b)}, {cfg.kmeans_iters} it) + pick": lambda: int(
            tf.reduce_sum(sampler(tf.constant([0, next(step)], tf.int64)))),
    }


def print_op_profile(trace_dir: str, title: str, top: int = 12, steps: int = 3) -> float:
    """Op time per step by op type from the newest tf.profiler trace in `trace_dir` (no TensorBoard needed).

    Returns the convolution kernels' time per step (ms).
    """
    import collections
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    times, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's op events
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Op events are "op_name:OpType". An async kernel (a jit_compile'd function: XLA) is one
                # "ExecutorState::ProcessAsync::Start" span holding the XLA runtime's own nested events.
                # Everything else is a span holding ops ("Process") or an annotation (threadpool, allocator).
                if name == "ExecutorState::ProcessAsync::Start":
                    op_type = "XLA function (async kernel)"
                elif ":" not in name or "::" in name:
                    continue
                else:
                    op_type = name.rsplit(":", 1)[-1]
                times[op_type] += event.duration_ps / 1e9 / steps
                counts[op_type] += 1
    total = sum(times.values())
    print(f"\nop time per step, {title}: {total:.1f} ms (summed over threads), {sum(counts.values()) // steps} ops"
          f"\n\n| op type | ms | % | ops |\n|---|---|---|---|")
    for op_type, ms in times.most_common(top):
        print(f"| {op_type} | {ms:.1f} | {100 * ms / total:.0f} | {counts[op_type] // steps} |")
    conv = {t: ms for t, ms in times.items() if "Conv2D" in t}
    print(f"convolution kernels: {sum(conv.values()):.1f} ms ({100 * sum(conv.values()) / total:.0f}%), "
          f"{sum(counts[t] for t in conv) // steps} ops")
    return sum(conv.values())


def _warm(runners: dict, count: int) -> None:
    for run in runners.values():
        for _ in range(count):
            run()


def _report(title: str, per_round: dict[str, list[float]]) -> dict[str, float]:
    medians = {name: statistics.median(v) for name, v in per_round.items()}
    print(f"\n{title}\n\n| | median ms/step | min | max |\n|---|---|---|---|")
    for name, v in per_round.items():
        print(f"| {name} | {medians[name]:.1f} | {min(v):.1f} | {max(v):.1f} |")
    return medians


def main(argv):
    del argv
    sys.stdout.reconfigure(line_buffering=True)  # results appear as they come, also through a pipe
    tf.get_logger().setLevel("ERROR")  # one train function per method: Keras' retracing warning is expected
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    if FLAGS.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_threads)
    for name in FLAGS.methods + FLAGS.extra:
        if name not in VARIANTS:
            method_config(name)  # an unknown method is a ConfigError before any work
    for bn in FLAGS.bn:
        with use_batchnorm(bn):  # an unknown kind is a ConfigError before any work
            pass
    b = FLAGS.batch_size
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"load avg {os.getloadavg()[0]:.2f}, TF {tf.__version__}, Keras {keras.__version__}, "
          f"jit_compile={FLAGS.jit_compile}, precision={FLAGS.precision}, intra-op threads={FLAGS.threads or 'default'}, "
          f"inter-op threads={FLAGS.inter_threads or 'default'}")
    print(f"ID batch {b}, images {IMAGE_SHAPE}, {FLAGS.reps} rounds x {FLAGS.steps} steps, methods interleaved")
    for arch in FLAGS.archs:
        rng = np.random.default_rng(0)
        trainers, runners = {}, {}
        for bn in FLAGS.bn:
            for method in FLAGS.methods + FLAGS.extra:
                name = method if len(FLAGS.bn) == 1 else f"{method}[{bn}]"
                trainers[name], runners[name] = _make_trainer(arch, method, b, rng, bn)
        params = next(iter(trainers.values())).classifier.count_params()
        start = time.perf_counter()
        _warm(runners, 1 + FLAGS.warmup)
        kwargs = f" {','.join(FLAGS.arch_kwargs)}" if FLAGS.arch_kwargs else ""
        print(f"\n## {arch}{kwargs} ({params:,} params; tracing + warm-up {time.perf_counter() - start:.0f} s)")
        per_round = time_steps(runners, FLAGS.reps, FLAGS.steps)
        medians = _report("train step (OODTrainer, compiled train function)", per_round)
        tags = [""] if len(FLAGS.bn) == 1 else [f"[{bn}]" for bn in FLAGS.bn]
        for tag in tags:
            for num, den, target in (("greg", "energy", 2.2), ("greg_plus", "greg", 1.3),
                                     ("greg_plus", "greg_aux2", None), ("greg_plus_bf16", "greg", 1.3),
                                     ("greg_plus_bf16", "greg_aux2", None), ("energy", "ce", None)):
                num, den = num + tag, den + tag
                if num in medians and den in medians:
                    verdict = "" if target is None else f" (target <= {target}: {'met' if medians[num] / medians[den] <= target else 'MISSED'})"
                    # Within a round the two ran seconds apart: their ratio cancels slower load drift.
                    paired = statistics.median(a / b for a, b in zip(per_round[num], per_round[den]))
                    print(f"{num} / {den} = {medians[num] / medians[den]:.2f} (median of per-round ratios "
                          f"{paired:.2f}){verdict}")
        if len(FLAGS.bn) == 2:
            first, second = FLAGS.bn
            for method in FLAGS.methods + FLAGS.extra:
                print(f"{method}: {second} / {first} = {medians[f'{method}[{second}]'] / medians[f'{method}[{first}]']:.2f}")
        if FLAGS.trace_dir:
            conv_ms = {}
            for method, run in runners.items():
                tf.profiler.experimental.start(os.path.join(FLAGS.trace_dir, f"{arch}_{method}"))
                for _ in range(3):
                    run()
                tf.profiler.experimental.stop()
                conv_ms[method] = print_op_profile(os.path.join(FLAGS.trace_dir, f"{arch}_{method}"),
                                                   f"{arch} {method}")
            if "greg" in conv_ms and "energy" in conv_ms:
                print(f"\nconvolution kernels alone: greg / energy = {conv_ms['greg'] / conv_ms['energy']:.2f}")
            print(f"profiler traces: tensorboard --logdir {FLAGS.trace_dir}")
        if FLAGS.parts:
            parts = {}
            for tag in tags:
                tr = trainers.get("greg_plus" + tag) or OODTrainer(trainers[FLAGS.methods[0] + tag].classifier,
                                                                   method_config("greg_plus"))
                parts.update({name + tag: fn for name, fn in part_functions(tr, b, rng).items()})
            _warm(parts, 1 + FLAGS.warmup)
            _report("parts of a step (each its own tf.function)", time_steps(parts, FLAGS.reps, FLAGS.steps))


if __name__ == "__main__":
    run_app(main)
