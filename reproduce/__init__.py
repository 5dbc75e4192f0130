"""Reproduction of the experiment list (E1-E12): `python -m reproduce` (see reproduce/runner.py).

Tooling beside the library: nothing in cnn_jax/ imports it.
"""
