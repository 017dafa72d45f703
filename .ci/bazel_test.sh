#!/usr/bin/env bash
# CI: run kood's fast tests under Bazel, offline, with Debian's Bazel 4.2.3.
# Python packages (tensorflow, keras, ...) come from the system Python: install
# them first (python -m pip install -e '.[test]', as .ci/run does).
# See docs/bazel.md for why the offline configuration looks the way it does.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bazel >/dev/null; then
  apt-get update
  apt-get install -y bazel-bootstrap bazel-rules-cc bazel-platforms bazel-skylib
fi
export TF_CPP_MIN_LOG_LEVEL=2
# The BUILD check first: it says exactly what to add when BUILD is stale.
python -m tools.build_check
bazel build //:all
# Slow tests (@pytest.mark.slow) are skipped inside each py_test by pyproject's
# addopts, as in the plain pytest run.
bazel test //:all "$@"
