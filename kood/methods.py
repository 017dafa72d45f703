"""`--method` presets. A preset only sets the underlying hyperparameters; any of
them can be set directly (a flag given on the command line wins over the preset).

Adding a method = one entry in METHODS (and, if it needs a new loss term, one
function in kood/losses.py used by kood/trainer.py).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from kood.errors import ConfigError

SCORE_LOSSES = ("none", "oe", "energy")
SAMPLERS = ("random", "energy_cluster")
GRAD_SPACES = ("normalized", "pixel")
POOL_DTYPES = ("float32", "bfloat16", "float16")


UNRESOLVED_AUTO = ("pool_factor='auto' is methods.md's rule N_aux / N_id, which needs the data sets' sizes: give "
                   "the trainer kood.methods.resolve_pool_factor(config, num_aux, num_id) (kood.train and "
                   "kood.bench do)")


@dataclasses.dataclass
class MethodConfig:
    """Loss and sampling hyperparameters of one training method (see docs/methods.md).

    Args:
        score_loss: auxiliary-data loss: `none` (plain CE), `oe` (outlier exposure,
            CE to uniform on outliers) or `energy` (Liu et al. 2020 squared hinge on energies).
        energy_weight: lambda_S, weight of the energy loss.
        oe_weight: weight of the OE loss (Hendrycks et al. 2019 use 0.5).
        m_in, m_out: energy margins (GReg code: -25 / -7 for every dataset).
        grad_weight: lambda_grad of the GReg input-gradient penalty (0 = off).
        grad_space: input space the gradient norm is measured in: `normalized`
            (the model's input after mean/std, the paper's choice) or `pixel` (0..255).
        sampler: `random` (a random auxiliary batch) or `energy_cluster` (GReg+ Algorithm 1).
        cluster_k: K-means clusters, used as min(cluster_k, B_id).
        pool_factor: GReg+ candidate pool size as a multiple of the ID batch size (may be fractional;
            the pool is round(pool_factor x B)). methods.md's rule is N_aux / N_id (the auxiliary
            set read once per epoch): 6 for CIFAR (50K) with 300K RandomImages, the default.
            `"auto"`: that rule (at least 2), computed by kood.train / kood.bench from the train
            splits' sizes (`resolve_pool_factor`); a trainer needs the number.
        two_way: GReg+ takes both the lowest- and highest-energy sample of each cluster.
        kmeans_iters: Lloyd iterations of the in-graph K-means.
        pool_dtype: compute dtype of the GReg+ candidate-pool forward (weights stay float32):
            `float32` (the paper) or `bfloat16` / `float16`, ~2x faster where the hardware has
            them (GPU tensor cores; CPUs with AVX512-BF16). Training runs at the model's own
            precision (`kood.train --precision`), whatever the pool's.
        aux_batch_factor: auxiliary batch size as a multiple of the ID batch for the
            random sampler (the energy-cluster sampler selects 2 x B_id).
        temperature: T of the energy score.
    """

    score_loss: str = "none"
    energy_weight: float = 0.1
    oe_weight: float = 0.5
    m_in: float = -25.0
    m_out: float = -7.0
    grad_weight: float = 0.0
    grad_space: str = "normalized"
    sampler: str = "random"
    cluster_k: int = 64
    pool_factor: float | str = 6.0  # or "auto"
    two_way: bool = True
    kmeans_iters: int = 10
    pool_dtype: str = "float32"
    aux_batch_factor: float = 1.0
    temperature: float = 1.0

    @property
    def uses_aux(self) -> bool:
        return self.score_loss != "none" or self.grad_weight > 0 or self.sampler != "random"

    def aux_batch_size(self, batch_size: int) -> int:
        """Auxiliary images per step for ID batch `batch_size`: the GReg+ candidate pool, else the random batch."""
        if self.sampler == "energy_cluster":
            if self.pool_factor == "auto":
                raise ConfigError(UNRESOLVED_AUTO)
            return int(round(self.pool_factor * batch_size))
        return max(1, int(round(self.aux_batch_factor * batch_size)))

    def used(self) -> dict:
        """The settings this configuration acts on (for display): e.g. no sampler settings for random sampling."""
        unused = set()
        if self.score_loss != "energy":
            unused.add("energy_weight")
        if self.score_loss != "oe":
            unused.add("oe_weight")
        if self.score_loss != "energy" and self.grad_weight == 0:
            unused |= {"m_in", "m_out"}
        if self.grad_weight == 0:
            unused.add("grad_space")
        if self.sampler != "energy_cluster":
            unused |= {"cluster_k", "pool_factor", "two_way", "kmeans_iters", "pool_dtype"}
        if self.sampler == "energy_cluster" or not self.uses_aux:
            unused.add("aux_batch_factor")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}

    def validate(self) -> None:
        def bad(flag, msg):
            raise ConfigError(f"--{flag}: {msg}. Received: {flag}={getattr(self, flag)!r}")

        # Types first: a string number would fail in math.isfinite with a bare TypeError, and a float cluster
        # count or a string two_way ('no' is truthy) would pass the range checks.
        for name in ("energy_weight", "oe_weight", "m_in", "m_out", "grad_weight", "aux_batch_factor", "temperature",
                     "pool_factor"):
            value = getattr(self, name)
            if name == "pool_factor" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                bad(name, "must be a number" + (" or auto (the paper's rule N_aux / N_id)" if name == "pool_factor"
                                                else ""))
        for name in ("cluster_k", "kmeans_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                bad(name, "must be an integer")
        if not isinstance(self.two_way, (bool, np.bool_)):
            bad("two_way", "must be True or False")
        if self.score_loss not in SCORE_LOSSES:
            bad("score_loss", f"must be one of {SCORE_LOSSES}")
        if self.sampler not in SAMPLERS:
            bad("sampler", f"must be one of {SAMPLERS}")
        if self.grad_space not in GRAD_SPACES:
            bad("grad_space", f"must be one of {GRAD_SPACES}")
        for name in ("energy_weight", "oe_weight", "m_in", "m_out", "grad_weight", "aux_batch_factor", "temperature"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be a finite number")
        for name in ("energy_weight", "oe_weight", "grad_weight"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.sampler != "random" and self.score_loss == "none" and self.grad_weight == 0:
            bad("sampler", "selects outliers for the auxiliary loss or the gradient penalty, but this method has "
                "neither (--score_loss=none, --grad_weight=0); use --method=greg_plus or energy_cluster")
        if self.m_in >= self.m_out:
            bad("m_in", f"must be below --m_out={self.m_out} (ID energies are pushed below m_in, outliers above m_out)")
        if self.cluster_k < 1:
            bad("cluster_k", "must be >= 1")
        if self.pool_factor == "auto":
            if self.sampler != "energy_cluster":
                bad("pool_factor", "sizes the candidate pool of --sampler=energy_cluster (GReg+)")
        elif not math.isfinite(self.pool_factor):
            bad("pool_factor", "must be a finite number or auto (the paper's rule N_aux / N_id)")
        elif self.pool_factor < 2 and self.sampler == "energy_cluster":
            bad("pool_factor", "must be >= 2 for the energy_cluster sampler, which selects 2 x batch_size")
        if self.kmeans_iters < 1:
            bad("kmeans_iters", "must be >= 1")
        if self.pool_dtype not in POOL_DTYPES:
            bad("pool_dtype", f"must be one of {POOL_DTYPES}")
        if self.pool_dtype != "float32" and self.sampler != "energy_cluster":
            bad("pool_dtype", "only applies to the candidate pool of --sampler=energy_cluster (GReg+)")
        if self.aux_batch_factor <= 0:
            bad("aux_batch_factor", "must be > 0")
        if self.aux_batch_factor != 1.0 and not self.uses_aux:
            bad("aux_batch_factor", "sizes the auxiliary batch, but this method trains without auxiliary outliers")
        if self.aux_batch_factor != 1.0 and self.sampler == "energy_cluster":
            bad("aux_batch_factor", "applies to the random sampler; --sampler=energy_cluster trains on the "
                "2 x batch_size outliers it selects from --pool_factor x batch_size candidates")
        if self.temperature <= 0:
            bad("temperature", "must be > 0")


def resolve_pool_factor(config: MethodConfig, num_aux: int, num_id: int) -> MethodConfig:
    """`config` with `pool_factor="auto"` replaced by methods.md's rule N_aux / N_id (at least 2).

    Args:
        num_aux, num_id: images in the auxiliary and the ID train split.

    Example:
        resolve_pool_factor(method_config("greg_plus", pool_factor="auto"), 300_000, 50_000).pool_factor  # 6.0
    """
    if config.pool_factor != "auto":
        return config
    return dataclasses.replace(config, pool_factor=max(2.0, num_aux / num_id))


METHODS: dict[str, dict] = {
    "ce": dict(score_loss="none"),
    "oe": dict(score_loss="oe"),
    "energy": dict(score_loss="energy"),
    "greg": dict(score_loss="energy", grad_weight=1.0),
    "greg_plus": dict(score_loss="energy", grad_weight=1.0, sampler="energy_cluster"),
    "energy_cluster": dict(score_loss="energy", grad_weight=0.0, sampler="energy_cluster"),
    "oe_grad": dict(score_loss="oe", grad_weight=1.0),
}


def method_config(method: str, **overrides) -> MethodConfig:
    """The preset for `method` with `overrides` applied, validated.

    Example:
        cfg = method_config("greg_plus", cluster_k=32)
    """
    if method not in METHODS:
        raise ConfigError(f"--method: unknown method. Known: {sorted(METHODS)}. Received: method={method!r}")
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"Unknown method hyperparameters {sorted(unknown)}; known: {sorted(fields)}")
    config = MethodConfig(**{**METHODS[method], **overrides})
    config.validate()
    return config
