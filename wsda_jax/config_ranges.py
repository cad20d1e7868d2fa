"""The numeric range of every config key, checked before any work (`validate_ranges`).

`config_lib.validate` calls it; `--mode=compile` runs it alone, as that mode needs no
devices or data.
"""

from __future__ import annotations

import ml_collections

from wsda_jax import classes, config_schema

# (key, lowest, highest, what the message says): every numeric key's range. Keys not in
# the config (another version of it) are skipped; None = no bound on that side.
_INTEGER, _REAL = "an integer", "a number"
NUMERIC_RANGES = (
    ("seed", 0, None, _INTEGER),
    ("data.synthetic.seed", 0, None, _INTEGER),
    ("num_steps", 1, None, _INTEGER),
    ("profile.start_step", 0, None, _INTEGER),
    ("profile.num_steps", 1, None, _INTEGER),
    ("num_classes", 1, classes.NUM_CLASSES, _INTEGER),  # The datasets' train ids.
    ("log_every_steps", 1, None, _INTEGER),
    ("checkpoint_every_steps", 1, None, _INTEGER),
    ("keep_checkpoints", 1, None, _INTEGER),
    ("model.width", 1, None, _INTEGER),
    ("model.proj_dim", 1, None, _INTEGER),
    ("model.decoder_dim", 1, None, _INTEGER),
    ("model.drop_path_rate", 0.0, 1.0, _REAL),
    ("data.num_workers", -1, None, _INTEGER),
    ("data.prefetch_buffer_size", 1, None, _INTEGER),
    ("data.points_per_class", 1, None, _INTEGER),
    ("data.jitter", 0.0, None, _REAL),
    ("data.synthetic.height", 16, None, _INTEGER),
    ("data.synthetic.width", 16, None, _INTEGER),
    ("data.synthetic.num_source", 1, None, _INTEGER),
    ("data.synthetic.num_target_train", 1, None, _INTEGER),
    ("data.synthetic.num_target_val", 1, None, _INTEGER),
    ("loss.seg_mix", 0.0, None, _REAL),
    ("loss.seg_s", 0.0, None, _REAL),
    ("loss.seg_u", 0.0, None, _REAL),
    ("loss.edge_s", 0.0, None, _REAL),
    ("loss.contrast_ramp_steps", 0, None, _INTEGER),
    ("loss.mic", 0.0, None, _REAL),
    ("loss.imnet_fd", 0.0, None, _REAL),
    ("loss.imnet_fd_min_ratio", 0.0, 1.0, _REAL),
    ("mic.block_size", 1, None, _INTEGER),
    ("mic.mask_ratio", 0.0, 1.0, _REAL),
    ("data.rare_class_sampling.min_pixels", 0, None, _INTEGER),
    ("data.rare_class_sampling.min_crop_pixels", 0, None, _INTEGER),
    ("loss.inter", 0.0, None, _REAL),
    ("loss.intra_tgt", 0.0, None, _REAL),
    ("loss.intra_src", 0.0, None, _REAL),
    ("loss.im_u", 0.0, None, _REAL),
    ("loss.im_proto", 0.0, None, _REAL),
    ("loss.max_views", 1, None, _INTEGER),
    ("loss.inter_max_samples", 1, None, _INTEGER),
    ("loss.intra_max_samples", 1, None, _INTEGER),
    ("loss.inter_easy_threshold", 0.0, 1.0, _REAL),
    ("loss.intra_easy_threshold", 0.0, 1.0, _REAL),
    ("pseudo.threshold", 0.0, 1.0, _REAL),
    ("pseudo.proto_threshold", 0.0, 1.0, _REAL),
    ("pseudo.ignore_top", 0, None, _INTEGER),
    ("pseudo.ignore_bottom", 0, None, _INTEGER),
    ("ema.decay", 0.0, 1.0, _REAL),
    ("classmix.jitter_prob", 0.0, 1.0, _REAL),
    ("classmix.jitter_strength", 0.0, None, _REAL),
    ("classmix.blur_prob", 0.0, 1.0, _REAL),
    ("optim.lr", 0.0, None, _REAL),
    ("optim.head_lr_mult", 0.0, None, _REAL),
    ("optim.momentum", 0.0, 1.0, _REAL),
    ("optim.weight_decay", 0.0, None, _REAL),
    ("optim.warmup_steps", 0, None, _INTEGER),
    ("optim.power", 0.0, None, _REAL),
    ("optim.warmup_ratio", 0.0, 1.0, _REAL),
    ("eval.every_steps", 1, None, _INTEGER),
    ("eval.num_panels", 0, None, _INTEGER),
    ("eval.max_images", 0, None, _INTEGER),
)
# Must be > 0, not only >= 0: they divide.
POSITIVE = (
    "loss.temperature",
    "loss.base_temperature",
    "loss.boundary_tau",
    "data.rare_class_sampling.temperature",
)


def _is_number(value: object, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == _INTEGER else isinstance(value, int | float)


def validate_ranges(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError naming the first numeric key outside its range.

    Before any work: a zero period (`checkpoint_every_steps=0`) would otherwise divide
    by zero after compiling, and a negative learning rate or `num_steps=0` would run
    without complaint. (Batch sizes are checked in `validate`.)
    """
    for key, low, high, kind in NUMERIC_RANGES:
        present, value = config_schema.lookup(config, key)
        if not present:
            continue
        if not _is_number(value, kind):
            raise ValueError(f"config.{key}={value!r} must be {kind}")
        if low is not None and value < low:
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"config.{key}={value!r} must be {bound}")
        if high is not None and value > high:
            raise ValueError(f"config.{key}={value!r} must be in [{low}, {high}]")
    for key in POSITIVE:
        present, value = config_schema.lookup(config, key)
        if present and not (_is_number(value, _REAL) and value > 0):
            raise ValueError(f"config.{key}={value!r} must be > 0")
    present, betas = config_schema.lookup(config, "optim.betas")
    if present and not (
        len(betas) == 2 and all(_is_number(b, _REAL) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"config.optim.betas={tuple(betas)!r} must be two numbers in [0, 1)")
    for key, low in (("data.scale_range", 0.0), ("classmix.blur_sigma", 0.0)):
        present, pair = config_schema.lookup(config, key)
        if present and not (
            len(pair) == 2 and all(_is_number(v, _REAL) for v in pair) and low < pair[0] <= pair[1]
        ):
            raise ValueError(
                f"config.{key}={tuple(pair)!r} must be (low, high), {low} < low <= high"
            )
    present, scales = config_schema.lookup(config, "eval.scales")
    if present and not (scales and all(_is_number(v, _REAL) and v > 0 for v in scales)):
        raise ValueError(f"config.eval.scales={tuple(scales)!r} must be one or more numbers > 0")
