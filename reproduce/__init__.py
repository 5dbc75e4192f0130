"""Reproduction of ../shared/EXPERIMENTS.md: `python -m reproduce` (see reproduce/runner.py).

Tooling beside the library: nothing in cnn_jax/ imports it.
"""
