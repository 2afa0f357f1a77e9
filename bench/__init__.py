"""Benchmarks that measure the plugin (scripts run by path) and the small-scale reproduction
(``python -m bench.reproduce_small``); :mod:`bench.common` holds what they share."""
