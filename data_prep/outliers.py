r"""Convert an auxiliary outlier set (unlabelled; e.g. 300K RandomImages) to a kood dataset.

    python -m data_prep.outliers --source=npy:/data/300K_random_images.npy --out=data/rand300k --num_shards=16
"""

from absl import app

from data_prep._common import FLAGS, conversion_kwargs, define_conversion_flags, report

define_conversion_flags("outlier", ["outlier", "ood"])


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
