r"""Convert an auxiliary outlier set (unlabelled; e.g. 300K RandomImages) to a kood dataset.

    python -m data_prep.outliers --source=npy:/data/300K_random_images.npy --out=data/rand300k --num_shards=16
"""

from absl import flags

from data_prep import _common
from data_prep._common import convert_main, define_conversion_flags
from kood.errors import run_app

define_conversion_flags("outlier", ["outlier", "ood"])
flags.adopt_module_key_flags(_common)  # list the shared flags in --help


main = convert_main


if __name__ == "__main__":
    run_app(main)
