#!/usr/bin/env bash
# The low end of pyproject.toml's dependency ranges: builds a Python 3.10 venv with the LOWEST versions
# pyproject allows, installs kood into it (--no-deps) and runs the fast test suite there.
# Not part of .ci/run (it downloads ~1 GB and takes ~10 min).
#
#   bash tools/check_pins.sh [DIR]      # venv in DIR/venv (default /tmp/kood-pins); PYTHON=... picks the interpreter
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-/tmp/kood-pins}"

# pyproject.toml's lower bounds, one per dependency, and its other caps (checked against pyproject below). tensorflow-cpu stands
# in for tensorflow (same code, no CUDA wheels).
pins=(
  tensorflow-cpu==2.16.1
  keras==3.5.0
  tensorflow-datasets==4.9.3
  numpy==1.26.0
  scikit-learn==1.3.0
  scipy==1.10.0
  absl-py==2.0.0
  tensorboard==2.16.0
  pillow==10.0.0
  matplotlib==3.7.0
  pytest==7.0.0
  pytest-xdist==3.0.2
  psutil==5.9.0
  'tensorflow-metadata<1.21'  # not a lower bound: pyproject's cap, as written there
)

python="${PYTHON:-python3.10}"
if ! "$python" --version >/dev/null 2>&1; then  # e.g. a pyenv shim with 3.10 installed but not selected
  python="$(ls -d "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.10*/bin/python 2>/dev/null | head -1)"
fi
[[ -n "$python" ]] || { echo "check_pins: no Python 3.10 found; set PYTHON=/path/to/python3.10" >&2; exit 2; }

mkdir -p "$dir"
"$python" -m venv "$dir/venv"
py="$dir/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "${pins[@]}"
"$py" -m pip install -q --no-deps -e "$repo"

# The list above must be exactly pyproject's lower bounds (tensorflow-cpu for tensorflow) and caps.
"$py" - "$repo/pyproject.toml" "${pins[@]}" <<'EOF'
import re, sys
from packaging.requirements import Requirement
from packaging.version import Version

text = open(sys.argv[1]).read().split("[project]")[1].split("[tool.")[0]  # not [build-system]
reqs = [Requirement(s) for s in re.findall(r'"([A-Za-z][\w.-]*[<>=!][^"]*)"', text)]
lows = {r.name.lower(): Version(s.version) for r in reqs for s in r.specifier if s.operator == ">="}
pins = {n.lower(): Version(v) for n, v in (p.split("==") for p in sys.argv[2:] if "==" in p)}
caps = [p for p in sys.argv[2:] if "==" not in p and f'"{p}"' not in text]
if caps:
    sys.exit(f"check_pins: not in pyproject.toml as written: {caps}")
pins["tensorflow"] = pins.pop("tensorflow-cpu")
diff = {n: (str(pins.get(n)), str(lows.get(n))) for n in sorted(pins.keys() | lows.keys()) if pins.get(n) != lows.get(n)}
if diff:
    sys.exit(f"check_pins: the pins differ from pyproject's lower bounds (name: (pin, bound)): {diff}")
EOF
"$py" -m pip list --format=freeze | grep -iE '^(tensorflow|keras|numpy|scikit|scipy|absl|tensorboard|pillow|matplotlib|pytest|psutil|protobuf)'

cd "$repo"
TF_CPP_MIN_LOG_LEVEL=2 "$py" -m pytest -n 2 -q
