"""Post-hoc OOD detectors, one module each, behind one interface (`kood.detectors.base.Detector`).

Every detector scores higher = more OOD. `DETECTORS` is the one registry.

Example:
    det = make_detector("react", model, percentile=90).fit(id_train)
    scores = det.score(images)
"""

from __future__ import annotations

import inspect

import keras

from kood.detectors.ash import Ash
from kood.detectors.base import Detector
from kood.detectors.dice import Dice
from kood.detectors.energy import Energy
from kood.detectors.gen import Gen
from kood.detectors.gradnorm import GradNorm
from kood.detectors.kl_matching import KlMatching
from kood.detectors.knn import Knn
from kood.detectors.mahalanobis import Mahalanobis
from kood.detectors.max_logit import MaxLogit
from kood.detectors.msp import Msp
from kood.detectors.odin import Odin
from kood.detectors.react import React
from kood.detectors.residual import Residual
from kood.detectors.temp_scale import TempScale
from kood.detectors.vim import Vim
from kood.errors import ConfigError

DETECTORS: dict[str, type[Detector]] = {
    "msp": Msp,
    "max_logit": MaxLogit,
    "energy": Energy,
    "odin": Odin,
    "temp_scale": TempScale,
    "react": React,
    "dice": Dice,
    "ash": Ash,
    "knn": Knn,
    "vim": Vim,
    "residual": Residual,
    "mahalanobis": Mahalanobis,
    "gradnorm": GradNorm,
    "kl_matching": KlMatching,
    "gen": Gen,
}


def make_detector(name: str, model: keras.Model, **hyperparams) -> Detector:
    """Builds the detector registered as `name`; unknown names list the known ones.

    Example:
        det = make_detector("energy", model, temperature=1.0)
    """
    if name not in DETECTORS:
        raise ConfigError(f"Unknown detector. Known: {sorted(DETECTORS)}. Received: detector={name!r}")
    try:
        return DETECTORS[name](model, **hyperparams)
    except TypeError as e:  # an unknown hyperparameter: name the detector and its hyperparameters
        known = [p for p in inspect.signature(DETECTORS[name]).parameters if p != "model"]
        raise ConfigError(f"{name}: bad hyperparameter ({e}); {name} takes {known or 'none'} "
                          f"(see {DETECTORS[name].__module__}). Received: {hyperparams}") from e


__all__ = ["DETECTORS", "Detector", "collect_outputs", "make_detector"] + [c.__name__ for c in DETECTORS.values()]
