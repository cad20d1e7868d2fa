"""Every loss of the method (docs/method.md §4, 6, 8, 9); pure, jittable, fixed shapes.

Logits are float `[B, H, W, C]` (NHWC), labels int `[B, H, W]` with 255 = ignore.
Losses are computed in float32 whatever the input dtype. Label values outside
[0, C) other than 255 raise a ValueError on eager calls only: under `jax.jit` the
values are unknown at trace time (see `label_ops.check_label_values`), and such
pixels are then treated as ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsda_jax import classes, label_ops, sampling


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, H, W, C], got shape {logits.shape}")
    if labels.shape != logits.shape[:3]:
        raise ValueError(f"labels {labels.shape} must match logits {logits.shape[:3]}")


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    ignore_label: int = classes.IGNORE_LABEL,
) -> jax.Array:
    """Mean over non-ignored pixels of the (weighted) per-pixel cross-entropy.

    `sum(w * ce over valid) / count(valid)`: the weight scales the numerator only,
    like the reference's pixel-weighted ClassMix loss. 0 when no pixel is valid.

    Args:
      logits: float `[B, H, W, C]`.
      labels: int `[B, H, W]`, `ignore_label` for ignored pixels.
      weights: optional float `[B, H, W]` pixel weights.
    Returns: float32 scalar.
    """
    _check_logits_labels(logits, labels)
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights {weights.shape} must match labels {labels.shape}")
    num_classes = logits.shape[-1]
    label_ops.check_label_values(labels, num_classes, "labels", ignore_label)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    if weights is not None:
        ce = ce * weights.astype(jnp.float32)
    total = jnp.sum(jnp.where(valid, ce, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def image_level_loss(logits: jax.Array, presence: jax.Array) -> jax.Array:
    """Multi-label loss of log-mean-exp pooled logits against class presence (docs/method.md §6).

    `s_bc = logsumexp_hw(L) - log(H * W)`, loss = mean over B and C of
    `BCE(sigmoid(s), y)`, written with log-sigmoids so it never overflows.

    Args:
      logits: float `[B, H, W, C]`.
      presence: float `[B, C]` in [0, 1] (multi-hot).
    Returns: float32 scalar.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, H, W, C], got shape {logits.shape}")
    if presence.shape != (logits.shape[0], logits.shape[3]):
        raise ValueError(f"presence {presence.shape} must be (B, C) = {logits.shape[::3]}")
    _, height, width, _ = logits.shape
    logits = logits.astype(jnp.float32)
    # logsumexp by hand: about 1.5x faster than jax.nn.logsumexp on CPU at 512x512x19.
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=(1, 2)))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    total = jnp.sum(jnp.exp(logits - peak[:, None, None, :]), axis=(1, 2))
    pooled = jnp.log(total) + peak - jnp.log(height * width)
    y = presence.astype(jnp.float32)
    bce = -(y * jax.nn.log_sigmoid(pooled) + (1.0 - y) * jax.nn.log_sigmoid(-pooled))
    return jnp.mean(bce)


def _gradient_magnitude(maps: jax.Array, max_axis_name: str | None = None) -> jax.Array:
    """Central-difference gradient magnitude of `[B, H, W, C]` maps, zero padded.

    `sqrt(dx^2 + dy^2 + 1e-6)` divided by its maximum over the whole tensor, or over the
    tensors of every device along `max_axis_name` (inside shard_map).
    """
    padded = jnp.pad(maps, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2.0
    dx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2.0
    magnitude = jnp.sqrt(dx * dx + dy * dy + 1e-6)
    maximum = jnp.max(magnitude)
    if max_axis_name is not None:
        # all_gather (not pmax) so that the maximum stays differentiable.
        maximum = jnp.max(jax.lax.all_gather(maximum, max_axis_name))
    return magnitude / maximum


def boundary_loss(
    logits: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    tau: float = 0.5,
    ignore_label: int = classes.IGNORE_LABEL,
    max_axis_name: str | None = None,
) -> jax.Array:
    """Boundary loss on the source (docs/method.md §9): L1 between gradient magnitudes.

    Compares the gradient magnitude of a Gumbel-softmax of the logits with that of the
    one-hot labels, so predicted class boundaries are pushed onto the true ones. As in
    the reference, ignored pixels get logits 0 and label class 0. The Gumbel noise is
    `jax.random.gumbel(key, logits.shape)` (float32).

    Args:
      logits: float `[B, H, W, C]` full-resolution source logits.
      labels: int `[B, H, W]` source labels.
      key: PRNG key for the Gumbel noise.
      tau: Gumbel-softmax temperature.
      max_axis_name: normalise the magnitudes by their maximum over all devices of this
        mesh axis instead of this device's batch (the reference's DDP normalises per GPU).
    Returns: float32 scalar.
    """
    _check_logits_labels(logits, labels)
    num_classes = logits.shape[-1]
    label_ops.check_label_values(labels, num_classes, "labels", ignore_label)
    ignored = (labels == ignore_label) | (labels < 0) | (labels >= num_classes)
    logits = jnp.where(ignored[..., None], 0.0, logits.astype(jnp.float32))
    noise = jax.random.gumbel(key, logits.shape, dtype=jnp.float32)
    soft = jax.nn.softmax((logits + noise) / tau, axis=-1)
    target = jax.nn.one_hot(jnp.where(ignored, 0, labels), num_classes, dtype=jnp.float32)
    return jnp.mean(
        jnp.abs(
            _gradient_magnitude(soft, max_axis_name) - _gradient_magnitude(target, max_axis_name)
        )
    )


def pixel_prototype_contrastive_loss(
    anchors: jax.Array,
    labels: jax.Array,
    domains: jax.Array,
    valid: jax.Array,
    prototypes: jax.Array,
    *,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    cross_domain: bool = False,
) -> jax.Array:
    """Pixel-to-prototype contrastive loss over the valid anchors (docs/method.md §8 and 14).

    The reference's |A| x |A| matrix has column k = prototype of anchor k's label, so
    with `S_ic = f_i . P_c / T` it collapses exactly to |A| x C with column
    multiplicities `n_c` (valid anchors of class c, all domains):
    every positive column of anchor i is the prototype `P[y_i]`, hence
    `log_prob_ik = S_iy - log(exp(S_iy) + sum_{c != y_i} n_c exp(S_ic))` is the same
    for all positives k and equals their mean. Negatives (y_k != y_i) count whatever
    their domain. Anchor i has a positive iff some valid anchor k has y_k == y_i
    (itself included, as docs/method.md §8 states it) and, with `cross_domain` (the `inter`
    rule), d_k != d_i: i.e. the valid anchors of class y_i span more than one domain,
    which the per-class min and max domain decide.
    Loss = `-(T / T_b) * mean over valid anchors of l_i` (0 without a positive); 0 when
    nothing is valid or when the result is NaN. Prototypes are not differentiated.

    Args:
      anchors: float `[N, D]` anchor features.
      labels: int `[N]` anchor classes in [0, C) (ignored where not valid).
      domains: int `[N]` anchor domains (any integers).
      valid: bool `[N]`, the sampled set A.
      prototypes: float `[C, D]`.
    Returns: float32 scalar.
    """
    if anchors.ndim != 2:
        raise ValueError(f"anchors must be [N, D], got shape {anchors.shape}")
    num = anchors.shape[0]
    for name, x in (("labels", labels), ("domains", domains), ("valid", valid)):
        if x.shape != (num,):
            raise ValueError(f"{name} must be [N] = ({num},), got shape {x.shape}")
    if prototypes.ndim != 2 or prototypes.shape[1] != anchors.shape[1]:
        raise ValueError(f"prototypes must be [C, D={anchors.shape[1]}], got {prototypes.shape}")
    num_classes = prototypes.shape[0]
    if not isinstance(valid, jax.core.Tracer) and not isinstance(labels, jax.core.Tracer):
        label_ops.check_label_values(
            jnp.where(valid, labels, 0), num_classes, "labels (of valid anchors)"
        )

    valid = valid.astype(bool)
    labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    prototypes = jax.lax.stop_gradient(prototypes.astype(jnp.float32))
    scores = anchors.astype(jnp.float32) @ prototypes.T / temperature  # [N, C]
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * valid[:, None]
    multiplicity = jnp.sum(one_hot, axis=0)  # n_c, [C]

    own = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    # exp(S_iy) once for the positive column, n_c exp(S_ic) for every negative class.
    weights = own + (1.0 - own) * multiplicity[None, :]
    log_denominator = jax.nn.logsumexp(scores, axis=1, b=weights)
    log_prob = jnp.sum(own * scores, axis=1) - log_denominator  # [N]

    if cross_domain:
        big = jnp.iinfo(jnp.int32).max
        dom = domains.astype(jnp.int32)
        low = jax.ops.segment_min(jnp.where(valid, dom, big), labels, num_classes)
        high = jax.ops.segment_max(jnp.where(valid, dom, -big), labels, num_classes)
        has_positive = (low[labels] < dom) | (high[labels] > dom)
    else:
        has_positive = jnp.ones_like(valid)
    keep = valid & has_positive
    count = jnp.sum(valid).astype(jnp.float32)
    mean = jnp.sum(jnp.where(keep, log_prob, 0.0)) / jnp.maximum(count, 1.0)
    loss = -(temperature / base_temperature) * mean
    return jnp.where(jnp.isnan(loss), 0.0, loss)


def sampled_contrastive_loss(
    key: jax.Array,
    features: jax.Array,
    label: jax.Array,
    pred: jax.Array,
    prob: jax.Array,
    image_domain: jax.Array,
    prototypes: jax.Array,
    *,
    max_views: int,
    max_samples: int,
    easy_threshold: float,
    temperature: float,
    base_temperature: float,
    cross_domain: bool,
) -> tuple[jax.Array, jax.Array]:
    """Hard-anchor sampling then the pixel-to-prototype loss (one of inter / intra).

    For `inter` the caller concatenates the source and target halves along B (with
    `image_domain` 0 / 1), so the eligible count and the anchor budget span both.

    Args:
      key: PRNG key of the sampling.
      features: float `[B, h, w, D]`.
      label, pred: int `[B, h, w]`; prob: float `[B, h, w]` (see `sampling.sample_anchors`).
      image_domain: int `[B]` domain of each image.
      prototypes: float `[C, D]`.
    Returns: (float32 scalar loss, int32 scalar number of sampled anchors).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, h, w, D], got shape {features.shape}")
    if label.shape != features.shape[:3]:
        raise ValueError(f"label {label.shape} must match features {features.shape[:3]}")
    if image_domain.shape != (features.shape[0],):
        raise ValueError(
            f"image_domain must be [B] = ({features.shape[0]},), got {image_domain.shape}"
        )
    batch, height, width, dim = features.shape
    sample = sampling.sample_anchors(
        key,
        label,
        pred,
        prob,
        num_classes=prototypes.shape[0],
        max_views=max_views,
        max_samples=max_samples,
        easy_threshold=easy_threshold,
    )
    anchors = features.reshape(batch * height * width, dim)[sample.index]
    domains = image_domain.astype(jnp.int32)[sample.index // (height * width)]
    loss = pixel_prototype_contrastive_loss(
        anchors,
        sample.label,
        domains,
        sample.valid,
        prototypes,
        temperature=temperature,
        base_temperature=base_temperature,
        cross_domain=cross_domain,
    )
    return loss, jnp.sum(sample.valid, dtype=jnp.int32)


def prototype_image_loss(
    features: jax.Array, prototypes: jax.Array, presence: jax.Array
) -> jax.Array:
    """`im_proto` (docs/method.md §4.8): `image_level_loss` of the prototype logits
    `features . prototypes^T`; features float32 [B, h, w, D], prototypes [C, D] (no
    gradient), presence float32 [B, C]."""
    logits = jnp.einsum("bhwd,cd->bhwc", features, jax.lax.stop_gradient(prototypes))
    return image_level_loss(logits, presence)
