r"""Prints the configured source's classes, rarest first: pixel frequency, the images that
rare class sampling may draw for each and its sampling probability (the statistics are
computed once and kept beside the prepared source).

    python -m wsda_jax.tools.class_frequencies --config=configs/synthetic_coarse.py
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app
from ml_collections import config_flags

from wsda_jax import cli_errors
from wsda_jax.data import rare_class_sampling, sources

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)


def _print_table(argv: Sequence[str]) -> None:
    del argv
    config = _CONFIG.value
    if config is None:
        raise ValueError("--config is required")
    path = sources.ensure_prepared(config.data.source, config.data)
    records = sources.open_split(config.data.source, "train", config.data)
    pixels = rare_class_sampling.load_or_compute(path, records, config.num_classes)
    print(rare_class_sampling.frequency_table(pixels, config.data.rare_class_sampling), end="")


def main(argv: list[str]) -> None:
    cli_errors.run_reporting_errors(_print_table, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_errors.parse_flags)
