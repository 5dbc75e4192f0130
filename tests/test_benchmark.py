"""The benchmarks package (python -m benchmarks) runs end to end on a tiny model."""

import json
import multiprocessing
import os

import jax
import numpy as np
import pytest

from benchmarks import cases, cli, tables, train_step
from cnn_jax.models import build_model
from reproduce.reported import load_config

FIGURES = (
    'compile_s',
    'jax_synthetic_ips',
    'jax_pipeline_ips',
    'gflop_per_step',
    'achieved_tflops',
)


def test_quick_benchmark_writes_positive_figures(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert cli.main(['--quick', '--xla-flags=', '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    assert result['device']['platform'] == jax.devices()[0].platform
    (row,) = result['results']
    assert row['model'] == 'tiny' and row['batch'] == 16
    for key in FIGURES:
        assert row[key] is not None and row[key] > 0, key
    assert row['pipeline_overhead_pct'] is not None
    if result['device']['torch']:  # torch is optional
        assert row['torch_eager_ips'] > 0 and row['ratio_vs_torch_eager'] > 0
    for ips in row['window_images_per_s'].values():
        assert len(ips) == 2 and min(ips) > 0
    table = out.with_suffix('.md').read_text()
    assert '| tiny | 8x8x1 | 16 |' in table and 'ratio jax/torch' in table
    assert 'ratio jax/torch' in capsys.readouterr().out


def test_quick_sweep_benchmark(tmp_path):
    out = tmp_path / 'sweep.json'
    assert (
        cli.main(['--sweep', '--quick', '--xla-flags=', '--sweep-k', '1,2', '--json', str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert [r['k'] for r in result['rows']] == [1, 2]
    assert result['separate_ips'] > 0
    for r in result['rows']:
        assert r['images_per_s_all_variants'] > 0 and r['speedup_vs_separate'] > 0
    assert '| 2 |' in out.with_suffix('.md').read_text()


def _flax_params(case):
    model = build_model(case.config(), case.num_classes)
    x = jax.ShapeDtypeStruct((1, *case.input_shape), np.float32)
    shapes = jax.eval_shape(
        lambda x: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x,
                             train=False), x
    )  # fmt: skip
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize(
    'name', ['tiny', 'simplenn', 'cifar_cnn3', 'resnet20', 'vgg16', 'resnet18', 'resnet50']
)
def test_torch_twin_has_the_same_parameters(name):
    torch = pytest.importorskip('torch')
    case = cases.CASES[name]
    net = train_step.torch_model(case)
    assert sum(p.numel() for p in net.parameters()) == _flax_params(case)
    h, w, c = case.input_shape
    with torch.no_grad():
        assert tuple(net.eval()(torch.zeros(2, c, h, w)).shape) == (2, case.num_classes)


def test_peak_table_and_flags():
    assert cases.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4
    assert cases.peak_tflops('NVIDIA H100 PCIe', 'float32') == 378.0
    assert cases.peak_tflops('cpu', 'float32') is None
    table = tables.format_table([{'model': 'm', 'jax_pipeline_ips': 1234.5}])
    assert '| m | n/a | n/a | n/a | n/a | 1,234 |' in table


def test_forward_backward_split_of_a_tiny_model(tmp_path):
    out = tmp_path / 'split.json'
    args = ['--split', '--quick', '--xla-flags=', '--json', str(out)]
    assert cli.main(args) == 0
    (row,) = json.loads(out.read_text())['results']
    assert row['jax_forward_ms'] > 0 and row['jax_forward_backward_ms'] > 0
    if 'torch_forward_ms' in row:  # torch is optional
        assert row['torch_forward_backward_ms'] > 0 and row['forward_speed_ratio'] > 0
    assert '| jax_forward_ms |' in out.with_suffix('.md').read_text()


@pytest.mark.parametrize('norm', ['batchnorm', 'dropout'])
def test_torch_twin_of_e4s_cnn_has_its_parameters_and_layers(norm):
    torch = pytest.importorskip('torch')
    from benchmarks import torch_models

    config = load_config('cifar_cnn6.py')
    config.model_options.norm = norm
    model = build_model(config, 10)
    shapes = jax.eval_shape(
        lambda x: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x,
                             train=False), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    )  # fmt: skip
    net = torch_models.twin(model, (32, 32, 3), 10)
    flax_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))
    assert sum(p.numel() for p in net.parameters()) == flax_count
    kinds = {type(m).__name__ for m in net.modules()}
    assert ({'BatchNorm2d', 'BatchNorm1d'} <= kinds) == (norm == 'batchnorm')
    assert ({'Dropout2d', 'Dropout'} <= kinds) == (norm == 'dropout')
    with torch.no_grad():
        assert tuple(net.eval()(torch.zeros(2, 3, 32, 32)).shape) == (2, 10)


@pytest.mark.slow  # Spawns a process that imports JAX and torch.
def test_quick_benchmark_with_torch_in_its_own_process(tmp_path, monkeypatch):
    """--torch eager-process: torch's windows run in a spawned process, which ends with the
    benchmark, and the table says so."""
    pytest.importorskip('torch')
    from benchmarks import torch_process

    started, real = [], torch_process.eager_runner

    def eager_runner(*args):  # The real runner, noting the process it started.
        run = real(*args)
        started.extend(multiprocessing.active_children())
        return run

    monkeypatch.setattr(torch_process, 'eager_runner', eager_runner)
    out = tmp_path / 'bench.json'
    args = ['--quick', '--xla-flags=', '--torch', 'eager-process', '--json', str(out)]
    assert cli.main(args) == 0
    result = json.loads(out.read_text())
    (row,) = result['results']
    assert result['settings']['torch'] == 'eager-process'
    assert row['torch_eager_ips'] > 0 and row['ratio_vs_torch_eager'] > 0
    assert row['torch_device'] in ('cpu', 'cuda')  # Reported from the child.
    assert 'torch ran in a process of its own' in out.with_suffix('.md').read_text()
    assert len(started) == 1 and started[0].pid != os.getpid()
    assert not multiprocessing.active_children() and not started[0].is_alive()
