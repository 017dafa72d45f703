r"""Convert a synthetic ID set (for SIO) to a kood dataset, pseudo-labelling it if unlabelled.

    python -m data_prep.synthetic --source=npz:/data/cifar10_stylegan.npz --out=data/syn
    python -m data_prep.synthetic --source=folder:/data/ddpm_samples --out=data/syn \
        --pseudo_label_model=runs/ce --min_confidence=0.9
"""

from absl import app, flags
from kood.errors import run_app

from data_prep import _common
from data_prep._common import (FLAGS, cli_errors, conversion_kwargs, define_conversion_flags, report,
                               written_before)

define_conversion_flags("synthetic", ["synthetic"])
flags.adopt_module_key_flags(_common)  # list the shared flags in --help
flags.DEFINE_string("pseudo_label_model", None,
                    "Label the images with this trained kood classifier (.keras file or model dir with "
                    "best.keras): label = argmax, confidence = max softmax probability. Needed for an "
                    "unlabelled source; replaces the labels of a labelled one.")
flags.DEFINE_float("min_confidence", 0.0, "With --pseudo_label_model: drop images below this confidence.")
flags.DEFINE_integer("batch_size", 256, "With --pseudo_label_model: inference batch size.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kood.convert import convert, convert_and_pseudo_label
    from kood.errors import ConfigError

    if written_before(FLAGS.out):
        return
    with cli_errors(FLAGS.out):
        if FLAGS.pseudo_label_model:
            kwargs = conversion_kwargs()
            kwargs.pop("kind")
            overwrite, command = kwargs.pop("overwrite"), kwargs.pop("command")
            manifest = convert_and_pseudo_label(
                FLAGS.source, FLAGS.out, FLAGS.pseudo_label_model, min_confidence=FLAGS.min_confidence,
                batch_size=FLAGS.batch_size, overwrite=overwrite, command=command, **kwargs)
        else:
            if FLAGS["min_confidence"].present:
                raise ConfigError("--min_confidence needs --pseudo_label_model. "
                                  f"Received: min_confidence={FLAGS.min_confidence}")
            manifest = convert(FLAGS.source, FLAGS.out, **conversion_kwargs())
    report(manifest, FLAGS.out)


if __name__ == "__main__":
    run_app(main)
