"""Independent NumPy implementations written straight from docs/method.md; used only by tests.

Deliberately literal (loops, the |A| x |A| contrastive matrix, per-class loops) so
they share no trick with the JAX code they check.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE = 255


def resize_nearest(labels: np.ndarray, size) -> np.ndarray:
    """PyTorch nearest: output (i, j) reads source (floor(i*H/h), floor(j*W/w))."""
    batch, height, width = labels.shape
    out_h, out_w = size
    out = np.zeros((batch, out_h, out_w), labels.dtype)
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                out[b, i, j] = labels[
                    b, math.floor(i * height / out_h), math.floor(j * width / out_w)
                ]
    return out


def fuse(pred_lowres: np.ndarray, label_fullres: np.ndarray) -> np.ndarray:
    """Upsample prediction, overwrite with the label where not ignore, downsample."""
    up = resize_nearest(pred_lowres, label_fullres.shape[1:])
    fused = np.where(label_fullres != IGNORE, label_fullres, up)
    return resize_nearest(fused, pred_lowres.shape[1:])


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def cross_entropy(logits, labels, weights=None) -> float:
    batch, height, width, _ = logits.shape
    log_p = log_softmax(logits.astype(np.float64))
    total, count = 0.0, 0
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                if labels[b, i, j] == IGNORE:
                    continue
                w = 1.0 if weights is None else float(weights[b, i, j])
                total += -w * log_p[b, i, j, labels[b, i, j]]
                count += 1
    return total / count if count else 0.0


def image_level_loss(logits, presence) -> float:
    batch, height, width, classes = logits.shape
    losses = []
    for b in range(batch):
        for c in range(classes):
            values = logits[b, :, :, c].astype(np.float64).ravel()
            top = values.max()
            s = math.log(1.0 / (height * width)) + top + math.log(np.exp(values - top).sum())
            p = 1.0 / (1.0 + math.exp(-s))
            y = float(presence[b, c])
            losses.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    return float(np.mean(losses))


def _gradient_magnitude(maps: np.ndarray) -> np.ndarray:
    batch, height, width, classes = maps.shape

    def at(b, i, j, c):
        return maps[b, i, j, c] if 0 <= i < height and 0 <= j < width else 0.0

    out = np.zeros_like(maps)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                for c in range(classes):
                    dx = (at(b, i, j + 1, c) - at(b, i, j - 1, c)) / 2
                    dy = (at(b, i + 1, j, c) - at(b, i - 1, j, c)) / 2
                    out[b, i, j, c] = math.sqrt(dx * dx + dy * dy + 1e-6)
    return out / out.max()


def boundary_loss(logits, labels, gumbel_noise, tau=0.5) -> float:
    logits = logits.astype(np.float64).copy()
    labels = labels.copy()
    ignored = labels == IGNORE
    logits[ignored] = 0.0
    labels[ignored] = 0
    z = (logits + gumbel_noise) / tau
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    soft = z / z.sum(axis=-1, keepdims=True)
    one_hot = np.eye(logits.shape[-1])[labels]
    return float(np.mean(np.abs(_gradient_magnitude(soft) - _gradient_magnitude(one_hot))))


def contrastive_loss_full(
    anchors,
    labels,
    domains,
    valid,
    prototypes,
    temperature=0.1,
    base_temperature=0.07,
    cross_domain=False,
) -> float:
    """The |A| x |A| form of docs/method.md §8, literally."""
    idx = [i for i in range(len(valid)) if valid[i]]
    if not idx:
        return 0.0
    f = anchors[idx].astype(np.float64)
    y = np.asarray(labels)[idx]
    d = np.asarray(domains)[idx]
    p = prototypes.astype(np.float64)
    n = len(idx)
    s = np.zeros((n, n))
    for i in range(n):
        for k in range(n):
            s[i, k] = f[i] @ p[y[k]] / temperature
    total = 0.0
    for i in range(n):
        positives = [k for k in range(n) if y[k] == y[i] and (not cross_domain or d[k] != d[i])]
        negatives = [k for k in range(n) if y[k] != y[i]]
        if not positives:
            continue
        neg = sum(math.exp(s[i, k]) for k in negatives)
        log_probs = [s[i, k] - math.log(math.exp(s[i, k]) + neg) for k in positives]
        total += float(np.mean(log_probs))
    loss = -(temperature / base_temperature) * total / n
    return 0.0 if math.isnan(loss) else loss


def bilinear_resize(x, height, width):
    """[B, h, w, K] -> [B, height, width, K], bilinear with half-pixel centres and
    clamped borders (torch's interpolate(mode='bilinear', align_corners=False))."""

    def axis_weights(size_in, size_out):
        src = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        matrix = np.zeros((size_out, size_in))
        matrix[np.arange(size_out), low] += 1 - (src - low)
        matrix[np.arange(size_out), high] += src - low
        return matrix

    rows = axis_weights(x.shape[1], height)
    cols = axis_weights(x.shape[2], width)
    return np.einsum("Hh,bhwk,Ww->bHWk", rows, x.astype(np.float64), cols)


def update_prototypes(prototypes, features, center, member, center_features=None):
    """Per-class loop of docs/method.md §7; `center_features` (at `center`'s
    resolution) gives the class means when `center` is at a higher resolution."""
    if center_features is None:
        center_features = features
    out = prototypes.astype(np.float64).copy()
    dim = features.shape[-1]
    cf = center_features.reshape(-1, dim).astype(np.float64)
    f = features.reshape(-1, dim).astype(np.float64)
    center = center.ravel()
    member = member.ravel()
    for c in range(prototypes.shape[0]):
        if not np.any(center == c):
            continue
        mean = cf[center == c].mean(axis=0)
        members = f[member == c]
        w = members @ mean
        if w.sum() == 0:
            continue
        w = w / w.sum()
        out[c] = (w[:, None] * members).sum(axis=0)
    return out


def confusion_matrix(pred, label, num_classes) -> np.ndarray:
    out = np.zeros((num_classes, num_classes), np.int64)
    for p, t in zip(np.ravel(pred), np.ravel(label), strict=True):
        if t == IGNORE or not 0 <= t < num_classes or not 0 <= p < num_classes:
            continue
        out[t, p] += 1
    return out
