"""`--summary` needs no data: every config prints its table offline, E1's total by formula."""

import itertools
import os
import pathlib
import subprocess
import sys

import pytest

from cnn_jax import arithmetic, cli
from cnn_jax.data.metadata import dataset_metadata, model_input_shape
from cnn_jax.data.resolve import parse_source
from reproduce.reported import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    str(p.relative_to(ROOT / 'configs'))
    for p in (ROOT / 'configs').rglob('*.py')
    if p.name not in ('__init__.py', 'default.py')
)


def _total(text: str) -> int:
    line = next(ln for ln in text.splitlines() if ln.startswith('Total params: '))
    return int(line.split(': ')[1].replace(',', ''))


def test_e1_network_total_is_what_the_layer_formulas_give(capsys, monkeypatch):
    # EXPERIMENTS.md, E1: 3x3 convs (padding 1) 64,64,M,128,128,M,256,256,M,512,512,M,
    # 512,512,M on 64x64x3; flatten 2x2x512 -> 4096 -> 4096 -> 3 classes.
    channels = [3, 64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(arithmetic.conv_params(3, a, b) for a, b in itertools.pairwise(channels))
    side = 64
    for _ in range(5):
        side = arithmetic.pool_output_size(side, 2, 2)
    dense = (
        arithmetic.dense_params(side * side * 512, 4096)
        + arithmetic.dense_params(4096, 4096)
        + arithmetic.dense_params(4096, 3)
    )
    assert side == 2
    monkeypatch.setenv('TFDS_DATA_DIR', '/nonexistent')  # Nothing prepared to read.
    assert cli.print_summary(load_config('vgg.py')) == 0
    assert _total(capsys.readouterr().out) == convs + dense


def test_metadata_of_each_source_kind(tmp_path):
    from PIL import Image

    for split in ('train', 'test'):
        for name in ('cat', 'dog'):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new('RGB', (12, 10)).save(tmp_path / split / name / 'a.png')
    assert parse_source(f'folder:{tmp_path}').describe() == ((10, 12, 3), ['cat', 'dog'], True)
    assert parse_source('digits').describe().image_shape == (8, 8, 1)
    meta = parse_source('cifar10').describe()  # TFDS's feature description: no download.
    assert meta.image_shape == (32, 32, 3) and len(meta.class_names) == 10

    config = load_config('vgg.py')  # Three named classes of cifar10, resized to 64.
    meta = dataset_metadata(config)
    assert len(meta.class_names) == 3 and model_input_shape(config, meta) == (64, 64, 3)
    config = load_config('ablations/mnist_cnn_merged.py')
    with config.unlocked():
        config.dataset = 'digits'
        config.label_groups = ((0, 6), (1, 7), (2, 3, 5, 8), (4, 9))
    assert dataset_metadata(config).class_names == ['0+6', '1+7', '2+3+5+8', '4+9']


def test_every_config_prints_its_table_offline_without_loading_data(tmp_path):
    # One process for all configs: each summary must not decode or download anything.
    script = (
        'import sys\n'
        'from cnn_jax import cli\n'
        'from reproduce.reported import load_config\n'
        'import cnn_jax.data as data\n'
        'from cnn_jax.data import folder, sources\n'
        'def no_load(*a, **k):\n'
        "    raise AssertionError('--summary loaded the dataset')\n"
        'data.load_dataset = no_load\n'
        'sources.read_tfds = sources.read_idx = sources.read_digits = no_load\n'
        'folder.read_folder = no_load\n'
        'for name in sys.argv[1:]:\n'
        '    assert cli.print_summary(load_config(name)) == 0, name\n'
        "    print('OK', name, flush=True)\n"
    )
    env = {'TFDS_DATA_DIR': str(tmp_path), 'CNN_JAX_CACHE': str(tmp_path / 'cache')}
    r = subprocess.run(
        [sys.executable, '-c', script, *CONFIGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('Total params: ') == len(CONFIGS)
    assert [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith('OK ')] == CONFIGS


@pytest.mark.parametrize('config', ['vgg.py', 'mnist_cnn.py'])
def test_launch_summary_offline_with_the_configs_tfds_name(tmp_path, config):
    r = subprocess.run(
        [sys.executable, 'launch.py', f'--config=configs/{config}', '--summary'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Total params: ' in r.stdout


def test_metadata_of_an_archive_already_extracted_skips_the_marker(tmp_path, monkeypatch):
    """An extraction holds its '.complete' marker beside the archive's one folder: the
    metadata reads the folder whatever order the directory lists them in."""
    import tarfile

    from PIL import Image

    for split in ('train', 'test'):
        for name in ('cat', 'dog'):
            (tmp_path / 'imgs' / split / name).mkdir(parents=True)
            Image.new('RGB', (12, 10)).save(tmp_path / 'imgs' / split / name / 'a.png')
    archive = tmp_path / 'imgs.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(tmp_path / 'imgs', arcname='imgs')
    monkeypatch.setenv('CNN_JAX_CACHE', str(tmp_path / 'cache'))
    parse_source(f'folder:{archive}', cache_dir=str(tmp_path / 'cache')).read()  # Extracts.
    listed = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, 'iterdir', lambda p: iter(sorted(listed(p))))  # Marker 1st.
    assert parse_source(f'folder:{archive}').describe() == ((10, 12, 3), ['cat', 'dog'], True)
