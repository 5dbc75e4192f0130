"""Measurements of cnn_jax, outside the library: `python -m benchmarks --help`.

- cli: the command line (`python -m benchmarks`), and how the figures are taken;
- cases: the benchmarked models at their experiments' shapes, and the device;
- timing: interleaved timed windows;
- train_step: the compiled train step against PyTorch (eager and torch.compile);
- vectorized: vectorised sweeps (cnn_jax.sweep) against separate runs;
- xla_flags: XLA_FLAGS variants, each timed in its own process;
- torch_models: the PyTorch twins of cnn_jax's models, also the tests' torch reference;
- tables: Markdown tables of the results;
- gpu_check: `python -m benchmarks.gpu_check`, one command that proves a (GPU) machine:
  bring-up, speed against PyTorch, sweep, E8 (device_checks, e8_run, gpu_report;
  GPU_RUNBOOK.md).

Run from the repository root (it imports cnn_jax and configs from there). Nothing in
cnn_jax imports this package.
"""
