"""`python -m benchmarks.gpu_check --tiny`: every step's figures, errors recorded, E8 resumed.

The command runs as a user runs it, in a subprocess, with TensorFlow, TFDS and CLU made
unimportable (a sitecustomize on PYTHONPATH, which E8's launch.py child inherits), as on
a GPU machine that has JAX and PyTorch only.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

from benchmarks import device_checks, gpu_check
from cnn_jax.models import MODELS
from tests.test_folder_decode import extract_sample

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')
HAVE_TORCH = importlib.util.find_spec('torch') is not None  # Without it JAX runs alone.

# Imported at every Python start through PYTHONPATH: `import tensorflow` (and TFDS, CLU)
# raise ModuleNotFoundError and importlib.util.find_spec finds nothing, as where they are
# not installed.
BLOCKER = f"""
import sys

for name in {BLOCKED!r}:
    sys.modules[name] = None
"""


def run_gpu_check(tmp_path: pathlib.Path, *args: str, timeout: int = 3600) -> dict:
    """Runs the command without TF/TFDS/CLU; returns its gpu_check.json."""
    block = tmp_path / 'block'
    block.mkdir(exist_ok=True)
    (block / 'sitecustomize.py').write_text(BLOCKER)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(block), str(REPO)])}
    # One CPU device, as a one-GPU machine has (8 forced host devices would repeat every
    # replicated parameter update 8 times: minutes for the VGGs on a shared 2-core host).
    env['XLA_FLAGS'] = ''
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'benchmarks.gpu_check', '--tiny', '--out', str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / 'gpu_check.json').read_text())
    assert data['device']['platform'] == 'cpu'
    assert '# cnn_jax GPU check on cpu (cpu' in (out / 'gpu_check.md').read_text()
    return data


def test_blocker_blocks(tmp_path):
    """The sitecustomize really makes TensorFlow unimportable in the command's Python."""
    (tmp_path / 'sitecustomize.py').write_text(BLOCKER)
    code = 'try:\n    import tensorflow\n    print(True)\nexcept ImportError:\n    print(False)'
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.stdout.strip() == 'False', proc.stderr


def test_missing_archive_is_recorded_and_the_command_ends_well(tmp_path):
    data = run_gpu_check(tmp_path, '--steps', 'e8', '--e8-archive', str(tmp_path / 'none.tar.gz'))
    assert list(data['steps']) == ['e8']
    (row,) = data['steps']['e8']['rows']
    assert row['error'].startswith('FileNotFoundError: ')
    assert 'none.tar.gz not found' in row['error']
    assert data['steps']['e8']['status'] == 'done, with errors'


def test_unknown_step_is_a_usage_error(tmp_path):
    cmd = [sys.executable, '-m', 'benchmarks.gpu_check', '--out', str(tmp_path), '--steps', 'e9']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown step(s) ['e9']" in proc.stderr


def _e8_args(tmp_path: pathlib.Path) -> list[str]:
    """E8 on 70 JPEGs per class and split of the CIFAR-10 archive, decoded by Pillow into
    a fresh cache (as on a machine without TensorFlow)."""
    archive = tmp_path / 'cifar10-sample.tar.gz'
    if not archive.exists():
        root = extract_sample(CIFAR_ARCHIVE, tmp_path / 'sample', per_class=70)
        with tarfile.open(archive, 'w:gz') as tar:
            tar.add(root, arcname=root.name)
    return ['--e8-archive', str(archive), '--e8-cache-dir', str(tmp_path / 'cache')]


def check_bringup(step: dict) -> None:
    rows = step['rows']
    assert {r['model'] for r in rows if r['check'] == 'train_step'} == set(MODELS)
    aliases = {r['model']: r['same_network_as'] for r in rows if 'same_network_as' in r}
    assert aliases == {'vgg16': 'vgg', 'resnet18': 'resnet', 'cifar_cnn3': 'block_cnn'}
    rows = [r for r in rows if 'same_network_as' not in r and 'tiny_skipped' not in r]
    checked = {r['model'] for r in rows if r['check'] == 'train_step'}
    families = {device_checks.model_family(m) for m in MODELS}
    assert sorted(device_checks.model_family(m) for m in checked) == sorted(families)
    assert {r['check'] for r in rows} == {'train_step', 'bfloat16_step', 'vmapped_sweep_step'}
    for r in rows:
        assert 'error' not in r, r
        assert r['compile_and_first_step_s'] > 0 and r['step_s'] > 0
        assert len(r['mean_loss']) == r['variants']
    (bf16,) = [r for r in rows if r['check'] == 'bfloat16_step']
    assert bf16['dtype'] == 'bfloat16'
    (vmapped,) = [r for r in rows if r['check'] == 'vmapped_sweep_step']
    assert vmapped['variants'] == 4 and len(set(vmapped['mean_loss'])) > 1  # Not one variant.


def check_speed(step: dict) -> None:
    rows = [r for r in step['rows'] if 'scan_of' not in r]
    assert [(r['model'], r['dtype']) for r in rows] == [
        ('resnet50', 'bfloat16'),
        ('resnet50', 'float32'),
        ('resnet18_224', 'float32'),
        ('vgg_e1', 'float32'),
        ('resnet20', 'float32'),
        ('simplenn', 'float32'),
    ]
    # --tiny times the last row of each family (VGG, ResNet, the block CNNs).
    timed = [r for r in rows if 'tiny_skipped' not in r]
    assert [r['model'] for r in timed] == ['vgg_e1', 'resnet20', 'simplenn']
    for r in timed:
        assert 'error' not in r, r
        assert r['jax_pipeline_ips'] > 0 and r['compile_s'] > 0
        if HAVE_TORCH:
            assert r['torch_eager_ips'] > 0 and r['ratio_vs_torch_eager'] > 0
        else:
            assert r['torch_eager_ips'] is None
        assert r['torch_compile_ips'] is None
        assert r['torch_compile_skipped'].startswith('--tiny')
        assert r['pct_of_peak'] is None  # A CPU has no peak in the table.
    scanned = [r for r in step['rows'] if 'scan_of' in r]
    assert [r['scan_of'] for r in scanned] == ['simplenn']  # --tiny: the last one only.
    for r in scanned:
        assert 'error' not in r, r
        assert r['chunk'] == 4 and r['per_step_ips'] > 0 and r['scan_ips'] > 0


def check_sweep(step: dict) -> None:
    result = step['result']
    assert [r['k'] for r in result['rows']] == [1, 2]  # --tiny; 1, 2, 4, 8 otherwise.
    assert result['separate_ips'] > 0
    assert all(r['speedup_vs_separate'] > 0 for r in result['rows'])


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason='needs ../shared/data/cifar10-jpeg.tar.gz')
def test_tiny_gpu_check_end_to_end_and_e8_resumes(tmp_path):
    """Every step has its figures; E8, stopped by its budget, resumes in a second run.

    --e8-budget-s 0 stops E8 as soon as it has trained a step (checkpointed, exit 130);
    the second invocation, E8 only, goes on from that checkpoint to the end and keeps
    the first run's other steps in the report.
    """
    first = run_gpu_check(tmp_path, '--e8-budget-s', '0', *_e8_args(tmp_path))
    steps = first['steps']
    assert list(steps) == ['bringup', 'speed', 'sweep', 'e8']
    for name in ('bringup', 'speed', 'sweep'):
        assert steps[name]['status'] == 'done', steps[name]
    check_bringup(steps['bringup'])
    check_speed(steps['speed'])
    check_sweep(steps['sweep'])
    md = (tmp_path / 'out' / 'gpu_check.md').read_text()
    assert '| ok |' in md and 'skipped: --tiny: one model per family' in md
    (stopped,) = steps['e8']['rows']
    assert stopped['status'].startswith('stopped at the deadline, checkpointed'), stopped
    assert stopped['exit_code'] == 130 and stopped['resumed_from_step'] is None
    assert 1 <= stopped['last_step'] < stopped['total_steps'] == 12

    second = run_gpu_check(tmp_path, '--steps', 'e8', *_e8_args(tmp_path))
    assert second['steps']['speed'] == steps['speed']  # Kept from the first run.
    e8 = second['steps']['e8']
    (resumed,) = e8['rows']
    assert resumed['status'] == 'completed', resumed
    # The loop saved after the step it was in when the signal came, the last it logged.
    assert resumed['resumed_from_step'] == stopped['last_step']
    assert resumed['summary']['resumed_from_step'] == resumed['resumed_from_step']
    assert resumed['summary']['epochs_run'] == 3 and resumed['last_step'] == 12
    assert len(e8['invocations']) == 2
    workdir = tmp_path / 'out' / 'e8'
    epochs = [json.loads(line)['epoch'] for line in (workdir / 'metrics.jsonl').open()]
    assert [e for e in epochs if e] == [1, 2, 3]
    assert (workdir / 'curves.png').is_file()


def test_a_failing_figure_is_recorded_and_the_next_runs(tmp_path):
    """figure(): an exception becomes the row's error, the next figure still runs, a spent
    budget skips; gpu_check.json and .md are rewritten after each."""
    opts = gpu_check.parse_args(['--out', str(tmp_path), '--steps', 'speed'])
    report = gpu_check.Report(opts.out, opts.steps, ['--steps', 'speed'])
    report.set(device={'platform': 'gpu', 'device_kind': 'NVIDIA H100 80GB HBM3'})

    def broken() -> dict:
        raise RuntimeError('out of memory')

    gpu_check.figure(report, 'speed', {'model': 'resnet50', 'dtype': 'bfloat16'}, broken, opts)
    gpu_check.figure(
        report, 'speed', {'model': 'simplenn'}, lambda: {'jax_pipeline_ips': 5.0}, opts
    )
    opts.deadline = 0.0  # Spent.
    gpu_check.figure(report, 'speed', {'model': 'resnet20'}, broken, opts)
    rows = json.loads((tmp_path / 'gpu_check.json').read_text())['steps']['speed']['rows']
    assert rows[0]['error'] == 'RuntimeError: out of memory'
    assert 'raise RuntimeError' in rows[0]['traceback']
    assert rows[1] == {'model': 'simplenn', 'jax_pipeline_ips': 5.0}
    assert rows[2] == {'model': 'resnet20', 'skipped': 'the time budget is spent'}
    md = (tmp_path / 'gpu_check.md').read_text()
    assert md.startswith('# cnn_jax GPU check on NVIDIA H100 80GB HBM3 (gpu')
    assert '**error**: RuntimeError: out of memory' in md
    assert 'skipped: the time budget is spent' in md
