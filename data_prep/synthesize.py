r"""Train a small class-conditional generator on a real kood set and write synthetic ID images.

  python -m data_prep.synthesize --real=data/cifar10 --out=data/cifar10_syn --num_images=50000 \
      [--model=gmm|vae --epochs=30 --seed=0]

The output (kind=synthetic) has the real set's image shape, classes and
class_names; its manifest `extra.quality` holds the accuracy of a real-trained
classifier on the synthetic images and a Frechet distance on PCA features
(with the real-vs-real value for reference). See kood.synthesize.
"""

from absl import app, flags
from kood.errors import run_app

from data_prep._common import cli_errors, command_line, written_before

flags.DEFINE_string("real", None, "Real, labelled kood dataset dir to learn from.", required=True)
flags.DEFINE_string("out", None, "Output dataset dir.", required=True)
flags.DEFINE_integer("num_images", None, "Number of synthetic images (class-balanced).", required=True)
flags.DEFINE_enum("model", "gmm", ["gmm", "vae"], "gmm: per-class Gaussian mixtures in PCA space (fast, default); "
                  "vae: class-conditional VAE (MLP).")
flags.DEFINE_integer("epochs", 30, "VAE training epochs (ignored by gmm).")
flags.DEFINE_integer("seed", 0, "Seed; the same seed gives the same images.")
flags.DEFINE_string("split", None, "Real split to learn from (default: train, else the first split).")
flags.DEFINE_integer("num_shards", 1, "Output shards.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing dataset at --out.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import json

    from kood.synthesize import synthesize

    if written_before(FLAGS.out):
        return
    with cli_errors(FLAGS.out):
        manifest = synthesize(FLAGS.real, FLAGS.out, FLAGS.num_images, model=FLAGS.model,
                              epochs=FLAGS.epochs, seed=FLAGS.seed, split=FLAGS.split,
                              num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite, command=command_line())
    print(f"wrote {manifest.count('train')} synthetic images to {FLAGS.out}")
    print("quality:", json.dumps(manifest.extra["quality"], indent=2))


if __name__ == "__main__":
    run_app(main)
