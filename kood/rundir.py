"""What a trained-model path holds: the `.keras` file, the run's config and whether the run finished.

Shared by kood.evaluate and kood.export, so both read a run dir the same way (same checkpoint, same
energy temperature, same warning for a run that has not finished).
"""

from __future__ import annotations

import os
import sys

from kood.errors import ConfigError, DataError
from kood.manifest import read_json

CHECKPOINTS = ("best", "last")


def resolve_model(model_path: str, checkpoint: str = "best") -> tuple[str, dict | None]:
    """`(.keras file, run config or None)` for a run dir or a `.keras` file.

    A run dir gives its `best.keras` / `last.keras` (`checkpoint`) and its `config.json`; a `.keras`
    file gives the `config.json` next to it when there is one (a file inside a run dir). A run dir
    whose training has not finished (no `results.json`) is used with a warning on stderr.

    Example:
        file, config = resolve_model("runs/demo")   # ("runs/demo/best.keras", {...})
    """
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint must be one of {CHECKPOINTS}. Received: checkpoint={checkpoint!r}")
    model_path = os.path.expanduser(model_path)
    if os.path.isdir(model_path):
        run_dir, file = model_path, os.path.join(model_path, f"{checkpoint}.keras")
        if not os.path.isfile(file):
            raise DataError(f"--model_dir={model_path} has no {checkpoint}.keras: not a finished kood run dir "
                            f"(training writes best.keras / last.keras after each epoch). Pass a run dir or a "
                            f".keras file. Received: model_dir={model_path!r}")
    elif os.path.isfile(model_path):
        if not model_path.endswith(".keras"):
            raise DataError(f"--model_dir must be a kood run dir or a .keras file. Received: {model_path!r}")
        run_dir, file = os.path.dirname(model_path) or ".", model_path
    else:
        raise DataError(f"--model_dir={model_path} does not exist (expected a kood run dir or a .keras file)")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        return file, None
    config = read_json(config_path, "run config")
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: the run config must be a JSON object. Received: {type(config).__name__}")
    if not os.path.isfile(os.path.join(run_dir, "results.json")):
        print(f"warning: {run_dir}: the run has not finished (no results.json; rerun its kood.train command to "
              f"resume it): using {os.path.basename(file)} as it is now.", file=sys.stderr)
    return file, config


def run_id_data(model_path: str, config: dict | None) -> str:
    """The ID data dir the run trained on (its config.json), for a command whose --id_data defaults to it.

    Example:
        id_data = run_id_data("runs/demo", resolve_model("runs/demo")[1])
    """
    id_data = (config or {}).get("id_data")
    if not id_data:
        raise ConfigError(f"--id_data is required: {model_path} has no run config.json naming its ID data")
    if not os.path.isdir(id_data):  # e.g. a relative path saved by an older kood, from another working directory
        raise DataError(f"The run config.json of {model_path} names id_data={id_data!r}, which is not a "
                        "directory here; pass --id_data=DIR")
    return id_data


def run_finished(model_file: str) -> bool | None:
    """Whether the kood run holding `model_file` finished (has results.json); None outside a run dir.

    Example:
        run_finished("runs/demo/best.keras")   # True once kood.train has written runs/demo/results.json
    """
    run_dir = os.path.dirname(os.path.abspath(model_file))
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return None
    return os.path.isfile(os.path.join(run_dir, "results.json"))


def run_temperature(config: dict | None) -> float | None:
    """T of the energy score the run trained with (its method preset + overrides), if known."""
    if not config or "method" not in config:
        return None
    from kood.methods import METHODS, MethodConfig

    if config["method"] not in METHODS:
        raise DataError(f"run config.json names an unknown method {config['method']!r}; known: {sorted(METHODS)}")
    # Not re-validated: a run made by an older kood may hold a setting today's checks refuse.
    values = {**METHODS[config["method"]], **config.get("method_overrides", {})}
    return float(values.get("temperature", MethodConfig.temperature))
