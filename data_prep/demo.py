r"""Build the embedded demo data (offline, seconds): `python -m data_prep.demo --out=DIR`.

Writes DIR/id (digits 0-5, train/test), DIR/aux (outliers, digits 6-7),
DIR/ood (held-out OOD, digits 8-9) and DIR/syn (synthetic digits 0-5) from
scikit-learn's bundled digits; see kood.demo_data for the choices.
"""

from absl import app, flags
from kood.errors import run_app

from data_prep._common import cli_errors

flags.DEFINE_string("out", None, "Root directory for the demo datasets (id, aux, ood, syn).", required=True)
flags.DEFINE_integer("seed", 0, "Split and generator seed; the same seed gives byte-identical shards.")
flags.DEFINE_integer("image_size", 16, "Image side: 8 (native digits) or larger (bilinear upsampling).")
flags.DEFINE_integer("num_synthetic", 2000, "Number of synthetic ID images in DIR/syn.")
flags.DEFINE_boolean("overwrite", False, "Replace existing demo datasets under --out.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kood.demo_data import build_demo

    with cli_errors():
        dirs = build_demo(FLAGS.out, seed=FLAGS.seed, overwrite=FLAGS.overwrite, image_size=FLAGS.image_size,
                          num_synthetic=FLAGS.num_synthetic)
    for role, d in dirs.items():
        print(f"{role}: {d}")


if __name__ == "__main__":
    run_app(main)
