"""Runs one pytest file as a Bazel py_test: `pytest_main.py tests/test_x.py [pytest args]`.

The test's working directory is the workspace root inside its runfiles, so
pytest finds pyproject.toml (markers, `-m 'not slow'`) and conftest.py there.
"""

import os
import sys

import pytest

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Bazel's sandbox may give a read-only or missing HOME; keras writes ~/.keras.
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        os.environ["HOME"] = tmp
    # The cache plugin would write .pytest_cache into the read-only runfiles tree.
    sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
