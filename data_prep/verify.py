r"""Check a kood dataset directory end to end: `python -m data_prep.verify DIR [DIR ...]`.

Re-reads every record, checks counts and sha256 checksums against the manifest,
decodes every image and checks labels. Exit status 0 only if everything holds;
otherwise every problem is printed (file and record index) and the status is 1.
"""

from absl import app, flags
from kood.errors import run_app

flags.DEFINE_integer("max_problems", 100, "Stop listing after this many problems per directory.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("Usage: python -m data_prep.verify DIR [DIR ...]")
    from kood.verify import verify_dataset

    failed = 0
    for directory in argv[1:]:
        report = verify_dataset(directory, max_problems=FLAGS.max_problems)
        if report.ok:
            counts = ", ".join(f"{s}={n}" for s, n in report.records.items())
            print(f"OK {directory}: {counts}")
        else:
            failed += 1
            print(f"FAILED {directory}: {len(report.problems)} problem(s)")
            for problem in report.problems:
                print(f"  {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_app(main)
