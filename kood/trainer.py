"""`OODTrainer`: one custom Keras `train_step` for CE, OE, energy, GReg and GReg+.

The step composes the small pure functions of `kood.losses` and `kood.sampling`:

1. (GReg+) forward the candidate pool in inference mode, no gradient, and pick
   2 x B_id outliers by energy-based K-means sampling (in the graph);
2. ONE forward pass over `[x_id; x_aux]` (shared BatchNorm statistics), under a
   nested tape when the gradient penalty is on (double backprop);
3. loss = CE(ID) + energy_weight * L_energy | oe_weight * L_oe + grad_weight * L_grad.

Under a tf.distribute strategy with R replicas (docs/distributed.md) each replica runs this
step on its B / R share of the global batch; the GReg+ sampler picks 2 x B / R outliers from
the replica's own pool. Every loss term is a mean over the replica's samples, so the mean of
the R replica losses is the global-batch loss: each replica differentiates loss / R and the
optimizer sums the gradients over replicas. J is normalized by the global batch too (its
per-sample input-gradients carry 1/B, not R/B).

Example:
    trainer = OODTrainer(classifier, method_config("greg"))
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    trainer.fit(tf.data.Dataset.zip((id_ds, aux_ds)), steps_per_epoch=100, shuffle=False)
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from kood import losses, sampling
from kood.errors import ConfigError
from kood.methods import UNRESOLVED_AUTO, MethodConfig
from kood.models import REQUIRED_LAYERS, model_precision, normalized_model
from kood.models.layers import compute_dtype

METRIC_NAMES = ("loss", "ce_loss", "energy_loss", "oe_loss", "grad_penalty", "accuracy", "weight_grad_norm",
                "energy_id", "energy_aux", "grad_keep_id", "grad_keep_aux", "energy_active_id", "energy_active_aux")


@keras.saving.register_keras_serializable(package="kood")
class OODTrainer(keras.Model):
    """Wraps a kood classifier (see `kood.models.build_classifier`) with the OOD train step.

    Args:
        classifier: functional model with layers `normalize`, `features`, `classifier` (any Keras model laid
            out as `CLASSIFIER_RECIPE` says; `check_trainable_classifier` names what else is missing).
        config: the method's hyperparameters (`kood.methods.method_config`).
        seed: base seed of the in-graph sampler (combined with the step counter).

    Data given to `fit`: `(x_id, y_id)` batches for methods without auxiliary data,
    else `((x_id, y_id), x_aux)`; `x_aux` holds `aux_batch_size(B)` images. `trainer.save("t.keras")`
    saves the classifier, this config, the seed and the optimizer; `keras.models.load_model("t.keras")`
    gives the trainer back.
    """

    def __init__(self, classifier: keras.Model, config: MethodConfig, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        check_trainable_classifier(classifier)
        config.validate()
        if config.pool_factor == "auto":  # refused here, not at the first batch
            raise ConfigError(UNRESOLVED_AUTO)
        self.classifier = classifier
        self.config = config
        self.seed = int(seed)
        # Views of the classifier's own layers, not tracked (the classifier is: summary() and saving list it once).
        object.__setattr__(self, "normalize", classifier.get_layer("normalize"))
        object.__setattr__(self, "net", normalized_model(classifier))
        self._compute_dtype = "bfloat16" if model_precision(classifier) == "mixed_bfloat16" else "float32"
        self.trackers = {name: keras.metrics.Mean(name=name) for name in METRIC_NAMES}
        # Per-channel factor turning a gradient w.r.t. the normalized input into one w.r.t. pixels.
        std = tf.sqrt(tf.cast(self.normalize.variance, tf.float32))
        self._pixel_scale = tf.reshape(1.0 / std, [-1])
        # Every layer is already built (functional classifier): spares Keras the symbolic build it runs
        # under a tf.distribute strategy, which would call the model on `(x_id, y_id)`.
        self.built = True

    def call(self, images, training=False):
        return self.classifier(images, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (3.15, TF backend) pulls a batch and all-reduces it here under any strategy before it
        # checks whether anything needs building; with per-worker datasets under
        # MultiWorkerMirroredStrategy that reduce fails. Only the optimizer can be unbuilt here.
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.classifier.trainable_variables)

    def get_config(self) -> dict:
        return {"name": self.name, "classifier": keras.saving.serialize_keras_object(self.classifier),
                "config": dataclasses.asdict(self.config), "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> "OODTrainer":
        config = dict(config)
        classifier = keras.saving.deserialize_keras_object(config.pop("classifier"))
        return cls(classifier, MethodConfig(**config.pop("config")), **config)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def aux_batch_size(self, batch_size: int) -> int:
        """Auxiliary images per step the data pipeline must provide."""
        return self.config.aux_batch_size(batch_size)

    def select_outliers(self, pool: tf.Tensor, num_id: int, replica: tuple | None = None) -> tf.Tensor:
        """GReg+ sampling: indices of 2 x B_id candidates chosen by energy-based clustering.

        `replica` = (id, count) seeds the draw as that replica would (default: the current one).
        """
        if pool.shape[0] is not None and pool.shape[0] < 2 * num_id:
            raise ConfigError(f"GReg+ picks 2 x B = {2 * num_id} outliers from each auxiliary batch (the candidate "
                              f"pool), so the batch needs more images than that: aux_batch_size(B) = pool_factor x B "
                              f"= {self.aux_batch_size(num_id)}, as kood.train gives it. Received: {pool.shape[0]} "
                              f"auxiliary images for B = {num_id}")
        x = self.normalize(pool)
        if self.config.pool_dtype == self._compute_dtype:
            out = self.net(x, training=False)
        else:
            with compute_dtype(self.net, self.config.pool_dtype):
                out = self.net(tf.cast(x, self.config.pool_dtype), training=False)
        features = tf.stop_gradient(tf.cast(out["features"], tf.float32))
        energies = tf.stop_gradient(losses.energy_score(out["logits"], self.config.temperature))
        # Replicas draw different K-means++ seeds; one device (replica 0 of 1) keeps [seed, step].
        replica, num_replicas = replica or _replica()
        step = tf.cast(self.optimizer.iterations, tf.int64) * num_replicas + tf.cast(replica, tf.int64)
        seed = tf.stack([tf.cast(self.seed, tf.int64), step])
        return sampling.energy_cluster_sample(
            features, energies, num_select=2 * num_id, num_clusters=min(self.config.cluster_k, num_id),
            two_way=self.config.two_way, iters=self.config.kmeans_iters, seed=seed)

    @staticmethod
    def _unpack(data):
        """`((x_id, y_id), x_aux)` or `(x_id, y_id)` -> `x_id, y_id, x_aux | None`.

        `fit(x=...)` without `y` (arrays) reaches the step as Keras' 1-tuple `(x,)`: unwrapped.
        """
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        if isinstance(data, (tuple, list)) and len(data) == 2:
            if not isinstance(data[0], (tuple, list)):
                return data[0], data[1], None
            if len(data[0]) == 2 and not isinstance(data[1], (tuple, list)):
                return data[0][0], data[0][1], data[1]
        structure = tf.nest.map_structure(lambda t: tuple(getattr(t, "shape", ())), data)
        raise ConfigError("OODTrainer.fit takes batches of (x_id, y_id), or ((x_id, y_id), x_aux) for methods with "
                          "auxiliary outliers (e.g. tf.data.Dataset.zip((id_ds, aux_ds))). Received: a batch of "
                          f"structure {structure}")

    def compute_losses(self, x_id: tf.Tensor, y_id: tf.Tensor, x_aux: tf.Tensor | None,
                       training: bool = True) -> dict[str, tf.Tensor]:
        """Every loss term of the method on one (already sampled) batch; differentiable.

        One forward pass over `[x_id; x_aux]`, nested in a tape when the gradient
        penalty is on. Returns the terms, `loss` (their weighted sum), `logits` and `energies`.
        """
        cfg = self.config
        num_id = tf.shape(x_id)[0] if x_id.shape[0] is None else x_id.shape[0]
        use_aux = cfg.uses_aux and x_aux is not None
        x_norm = self.normalize(tf.concat([x_id, x_aux], 0) if use_aux else x_id)
        if cfg.grad_weight > 0:
            pixel_scale = self._pixel_scale if cfg.grad_space == "pixel" else None
            res = losses.score_gradient_penalty(self.net, x_norm, num_id, cfg.m_in, cfg.m_out,
                                                temperature=cfg.temperature, training=training,
                                                pixel_scale=pixel_scale)
            # mean ||dJ_r/dx|| over the replica's samples / R = the global-batch J's per-sample norms.
            logits, penalty = res["logits"], res["penalty"] / _replica()[1]
        else:
            logits, penalty = self.net(x_norm, training=training)["logits"], tf.constant(0.0)
        logits = tf.cast(logits, tf.float32)
        ce = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_id, logits[:num_id], from_logits=True))
        energies = losses.energy_score(logits, cfg.temperature)
        energy_term = oe_term = tf.constant(0.0)
        if use_aux and cfg.score_loss == "energy":
            energy_term = losses.energy_loss(energies[:num_id], energies[num_id:], cfg.m_in, cfg.m_out)
        if use_aux and cfg.score_loss == "oe":
            oe_term = losses.oe_loss(logits[num_id:])
        loss = ce + cfg.energy_weight * energy_term + cfg.oe_weight * oe_term + cfg.grad_weight * penalty
        if self.classifier.losses:
            loss += tf.add_n(self.classifier.losses)
        return {"loss": loss, "ce_loss": ce, "energy_loss": energy_term, "oe_loss": oe_term,
                "grad_penalty": penalty, "logits": logits, "energies": energies, "num_id": num_id}

    def _check_image_shapes(self, *batches) -> None:
        """A batch of another image shape than the classifier's input is named here: the step feeds the
        `normalize` layer directly, where Keras' message ('Dimensions must be equal ... BroadcastTo') names neither."""
        expected = tuple(self.classifier.input_shape[1:])
        for what, x in zip(("ID", "auxiliary"), batches):
            if x is None:
                continue
            got = tuple(x.shape[1:])
            if len(got) != len(expected) or any(e is not None and g is not None and e != g
                                                for e, g in zip(expected, got)):
                raise ConfigError(f"The {what} images must have the classifier's input shape {expected} "
                                  f"(batches [B, {', '.join(map(str, expected))}]). Received: {what} batch shape "
                                  f"{tuple(x.shape)}")

    def train_step(self, data):
        cfg = self.config
        x_id, y_id, x_aux = self._unpack(data)
        self._check_image_shapes(x_id, x_aux)
        if cfg.uses_aux and x_aux is None:  # kood.train refuses this too; the loss would drop terms silently
            raise ConfigError(f"This method (score_loss={cfg.score_loss}, grad_weight={cfg.grad_weight}, "
                              f"sampler={cfg.sampler}) trains on auxiliary outliers, but the data gives (x_id, y_id) "
                              f"batches: give ((x_id, y_id), x_aux) batches with aux_batch_size(B) auxiliary images")
        if x_aux is not None and cfg.sampler == "energy_cluster":
            if x_id.shape[0] is None:  # the sampler's cluster and pick counts are static
                raise ConfigError("GReg+ sampling needs batches of a fixed size: batch the ID and auxiliary "
                                  "datasets with drop_remainder=True. Received: ID batch shape "
                                  f"{tuple(x_id.shape)}")
            x_aux = tf.gather(x_aux, self.select_outliers(x_aux, int(x_id.shape[0])))
        num_replicas = _replica()[1]
        with tf.GradientTape() as tape:
            terms = self.compute_losses(x_id, y_id, x_aux, training=True)
            # The optimizer SUMS replica gradients (Keras does not scale a custom train_step's loss).
            scaled = terms["loss"] / num_replicas if num_replicas > 1 else terms["loss"]
        variables = self.classifier.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)

        num_id = terms["num_id"]
        s_id, s_aux = terms["energies"][:num_id], terms["energies"][num_id:]
        # Terms (and mask fractions) the method does not have, always 0, stay out of the progress line and
        # TensorBoard. A method with any of them has auxiliary data (checked above).
        has = {"energy_loss": cfg.score_loss == "energy", "oe_loss": cfg.score_loss == "oe",
               "grad_penalty": cfg.grad_weight > 0}
        values = {k: terms[k] for k in ("loss", "ce_loss", "energy_loss", "oe_loss", "grad_penalty")
                  if has.get(k, True)}
        values["accuracy"] = _accuracy(y_id, terms["logits"][:num_id])
        # Under R replicas: the norm of each replica's own (B / R batch) gradient, averaged over replicas.
        values["weight_grad_norm"] = tf.linalg.global_norm(grads) * num_replicas
        values["energy_id"] = tf.reduce_mean(s_id)
        if cfg.uses_aux:
            values["energy_aux"] = tf.reduce_mean(s_aux)
            if has["energy_loss"]:  # the mask fractions of the margins the method uses
                active_id, active_aux = losses.energy_loss_masks(s_id, s_aux, cfg.m_in, cfg.m_out)
                values.update(energy_active_id=_fraction(active_id), energy_active_aux=_fraction(active_aux))
            if has["grad_penalty"]:
                keep_id, keep_aux = losses.greg_masks(s_id, s_aux, cfg.m_in, cfg.m_out)
                values.update(grad_keep_id=_fraction(keep_id), grad_keep_aux=_fraction(keep_aux))
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return _step_outputs({name: self.trackers[name].result() for name in values})

    def test_step(self, data):
        x, y = data[:2] if isinstance(data, (tuple, list)) else (data, None)
        logits = tf.cast(self.classifier(x, training=False), tf.float32)
        ce = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        self.trackers["ce_loss"].update_state(ce)
        self.trackers["accuracy"].update_state(_accuracy(y, logits))
        self.trackers["energy_id"].update_state(tf.reduce_mean(losses.energy_score(logits, self.config.temperature)))
        return _step_outputs({n: self.trackers[n].result() for n in ("ce_loss", "accuracy", "energy_id")})

    @tf.function
    def score_grad_norm(self, images: tf.Tensor) -> tf.Tensor:
        """Per-sample L2 norm of d S(x) / d x in inference mode (paper Fig. 3), in `grad_space`."""
        x_norm = self.normalize(images)
        if self.config.grad_space == "normalized":
            return losses.score_input_grad_norms(self.net, x_norm, self.config.temperature)
        with tf.GradientTape() as tape:
            tape.watch(x_norm)
            total = tf.reduce_sum(losses.energy_score(self.net(x_norm, training=False)["logits"],
                                                      self.config.temperature))
        return losses.grad_norm_per_sample(tape.gradient(total, x_norm) * self._pixel_scale)


CLASSIFIER_RECIPE = (
    "OODTrainer needs a functional (or Sequential) Keras model whose input goes straight into a normalization "
    "layer named 'normalize' (keras.layers.Normalization(mean=..., variance=...) or kood.models.layers."
    "Normalization), whose penultimate [B, D] feature vector is the output of a layer named 'features' (e.g. the "
    "GlobalAveragePooling2D, or keras.layers.Activation('linear', name='features')), and whose logits come from a "
    "linear layer named 'classifier' (no softmax); kood.models.build_classifier builds such models")


def check_trainable_classifier(model) -> None:
    """Raises a ConfigError saying what to change unless `model` is a classifier OODTrainer can train.

    kood's own models always are; a user's model needs the layout of `CLASSIFIER_RECIPE`. Checked up front
    because each violation otherwise fails deep inside Keras/TF or, worse, trains on other inputs than the
    model's own (layers before `normalize` would be skipped by the train step).
    """
    def bad(problem, received):
        raise ConfigError(f"{problem}. {CLASSIFIER_RECIPE}. Received: {received}")

    if not isinstance(model, keras.Model):
        bad("`classifier` must be a keras.Model", f"classifier={type(model).__name__}")
    names = {layer.name for layer in model.layers}
    missing = [n for n in REQUIRED_LAYERS if n not in names]
    if missing:
        bad(f"The model has no layer named {missing}", f"model {model.name!r} with layers {sorted(names)}")
    layers = {n: model.get_layer(n) for n in REQUIRED_LAYERS}
    try:
        outputs = {n: layer.output for n, layer in layers.items()}
        model_input = model.inputs[0]
    except (AttributeError, TypeError, IndexError, ValueError) as e:  # subclassed model: no layer graph
        bad(f"The model's layers have no symbolic inputs/outputs (a subclassed keras.Model?): {str(e).rstrip('.')}",
            f"model {model.name!r} of type {type(model).__name__}")
    normalize = layers["normalize"]
    normalize_input = normalize.input
    op = getattr(getattr(normalize_input, "_keras_history", None), "operation", None)
    if type(op).__name__ == "Cast" and getattr(op, "dtype", None) == normalize.compute_dtype:
        # Keras < 3.10 records a mixed-precision layer's input autocast as a Cast op before the layer; the
        # layer casts again when the train step calls it on the raw batch, so that op skips nothing.
        normalize_input = op.input
    if len(model.inputs) != 1 or normalize_input is not model_input:
        bad("The 'normalize' layer must take the model's (single) input directly: the train step applies it to "
            "the raw batch, so layers before it would be skipped in training", f"{len(model.inputs)} model "
            f"input(s); 'normalize' applied to {getattr(normalize.input, 'name', normalize.input)!r}")
    if not hasattr(normalize, "variance"):
        bad("The 'normalize' layer must hold the input `variance` (the GReg penalty is measured w.r.t. its "
            "output)", f"'normalize' is a {type(normalize).__name__}")
    if len(outputs["features"].shape) != 2:
        bad("The 'features' layer must output a [B, D] vector (the penultimate features used by GReg+ "
            "sampling and the detectors)", f"'features' output shape {tuple(outputs['features'].shape)}")
    float16 = [layer.name for layer in model.layers if getattr(layer, "compute_dtype", None) == "float16"
               and not isinstance(layer, keras.layers.InputLayer)]  # an input's dtype is the global policy's
    if float16:
        raise ConfigError("kood trains in float32 or mixed_bfloat16: float16 would need loss scaling of the loss "
                          "and of the GReg penalty's inner gradient, which the train step does not do. Build the "
                          "model under keras.mixed_precision.set_global_policy('mixed_bfloat16') (or float32). "
                          f"Received: layers computing in float16: {float16[:3]}{' ...' if len(float16) > 3 else ''}")
    if len(model.outputs) != 1 or model.outputs[0] is not outputs["classifier"]:
        bad("The 'classifier' layer's logits must be the model's (single) output: the train step and the "
            "detectors use them, so a layer after it (e.g. a Softmax) would make model(x) differ from what is "
            "trained", f"{len(model.outputs)} model output(s), the last layer {model.layers[-1].name!r}")
    activation = getattr(layers["classifier"], "activation", None)
    if activation is not None and getattr(activation, "__name__", "linear") != "linear":
        bad("The 'classifier' layer must output logits (the energy score and the cross-entropy take logits)",
            f"'classifier' activation={activation.__name__!r}")


def _replica() -> tuple:
    """(replica id, replicas in sync) of the current replica context; (0, 1) outside one."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context, e.g. a callback calling the sampler
        return 0, 1
    return ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync


def _step_outputs(results: dict) -> dict:
    """Metric results as `fit` can reduce them.

    Keras (3.15) reduces step outputs of a MultiWorkerMirroredStrategy with
    `strategy.reduce("MEAN", v, axis=0)`, which rejects scalars (tensorflow/tensorflow#72388):
    give it shape [1] (-> a scalar mean).
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {k: tf.reshape(v, [1]) for k, v in results.items()}
    return results


def _fraction(mask: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.cast(mask, tf.float32))


def _accuracy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(labels, tf.int64)), tf.float32))
