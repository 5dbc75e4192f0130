"""cnn_jax: CNN image classification experiments in JAX/Flax, one command each."""

__version__ = '0.1.0'
