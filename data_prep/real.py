r"""Convert a labelled real data set (or an OOD test set) to a kood dataset.

    python -m data_prep.real --source=cifar:/data/cifar-10-batches-py --out=data/cifar10 --num_shards=4
    python -m data_prep.real --source=mat:/data/test_32x32.mat --out=data/svhn --kind=ood
"""

from absl import app

from data_prep._common import FLAGS, conversion_kwargs, define_conversion_flags, report

define_conversion_flags("real", ["real", "ood"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kood.convert import convert
    from kood.errors import ConfigError, DataError

    try:
        manifest = convert(FLAGS.source, FLAGS.out, **conversion_kwargs())
    except (ConfigError, DataError) as e:
        raise SystemExit(f"error: {e}")
    report(manifest, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
