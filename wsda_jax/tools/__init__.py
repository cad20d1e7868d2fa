"""Commands on top of the package: benchmarks, experiments, the batch browser, the
source class-frequency table. Nothing in the package imports them."""
