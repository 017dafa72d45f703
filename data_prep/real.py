r"""Convert a labelled real data set (or an OOD test set) to a kood dataset.

    python -m data_prep.real --source=cifar:/data/cifar-10-batches-py --out=data/cifar10 --num_shards=4
    python -m data_prep.real --source=mat:/data/test_32x32.mat --out=data/svhn --kind=ood
"""

from absl import flags

from data_prep import _common
from data_prep._common import convert_main, define_conversion_flags
from kood.errors import run_app

define_conversion_flags("real", ["real", "ood"])
flags.adopt_module_key_flags(_common)  # list the shared flags in --help


main = convert_main


if __name__ == "__main__":
    run_app(main)
