r"""Merge the parts of a conversion run with --task_index/--num_tasks: `python -m data_prep.merge DIR`.

    for i in 0 1 2 3; do
      python -m data_prep.outliers --source=npy:/data/300K_random_images.npy --out=data/rand300k \
          --num_shards=16 --num_tasks=4 --task_index=$i &
    done; wait
    python -m data_prep.merge data/rand300k && python -m data_prep.verify data/rand300k

Checks that all N parts in DIR/tasks/ exist, finished and agree (source, flags,
shape, classes, encoding, kind, shard plan), moves their shards into DIR,
computes the train mean/std from the parts' pixel sums and writes manifest.json
last. A missing, unfinished or mismatched task is named and nothing changes.
An interrupted merge can be rerun.
"""

from absl import app
from kood.errors import run_app

from data_prep._common import cli_errors, command_line, report


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("Usage: python -m data_prep.merge DIR")
    from kood.fanout import merge_tasks

    with cli_errors():
        manifest = merge_tasks(argv[1], command=command_line())
    report(manifest, argv[1])


if __name__ == "__main__":
    run_app(main)
