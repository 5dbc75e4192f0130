"""A mistake in the command line or the config ends as one 'error:' line and exit code 2.

launch.py runs in a subprocess, as a user runs it; every case fails before training
(exit 1 is kept for divergence, 130 for an interruption). The value checks and the input
size search are also tested in process, where they are cheap.
"""

import importlib
import pathlib
import subprocess
import sys

import pytest

from cnn_jax.config_checks import CHOICES, RULES, check_config
from cnn_jax.errors import ConfigError
from cnn_jax.models import create_model
from cnn_jax.models.input_size import check_input_size, min_square_size, model_name
from configs import default

ROOT = pathlib.Path(__file__).resolve().parents[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def assert_one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and lines[0][7:].strip(), lines
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    'args, fragments',
    [
        (
            ['--config.num_epoch=3'],
            ["unknown config key 'num_epoch'", "did you mean 'num_epochs'?"],
        ),
        (['--config.augment.flp=True'], ["'augment.flp'", "did you mean 'augment.flip'?"]),
        (['--config.batch_size=abc'], ['--config.batch_size=abc']),
        (['extra_argument'], ['unexpected arguments: extra_argument']),
    ],
)
def test_flag_mistakes(args, fragments, tmp_path):
    r = launch('--config=configs/quickstart.py', *args, f'--workdir={tmp_path}')
    assert_one_error_line(r, *fragments)
    assert not any(tmp_path.iterdir())  # Nothing ran.


@pytest.mark.parametrize(
    'config, fragments',
    [
        ('configs/no_such_config.py', ['cannot load --config=configs/no_such_config.py']),
        ('configs/simplenn.py:nope', ["simplenn.py has no variant 'nope'"]),
    ],
)
def test_config_file_mistakes(config, fragments, tmp_path):
    assert_one_error_line(launch(f'--config={config}', f'--workdir={tmp_path}'), *fragments)


def test_missing_config_flag():
    assert_one_error_line(launch(), '--config')


@pytest.mark.parametrize(
    'override, key',
    [
        ('--config.batch_size=-4', 'config.batch_size'),
        ('--config.val_fraction=1.0', 'config.val_fraction'),
    ],
)
def test_nonsense_values_fail_before_training(override, key, tmp_path):
    r = launch('--config=configs/quickstart.py', override, f'--workdir={tmp_path}')
    assert_one_error_line(r, key)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize('summary', [False, True], ids=['run', 'summary'])
def test_input_too_small_for_the_model(summary, tmp_path):
    # SimpleNN: 5x5 and 3x3 'valid' convs, each with a 2x2 pool: 12 -> 8 -> 4 -> 2 -> 1.
    args = ['--config=configs/simplenn.py', '--config.dataset=digits', f'--workdir={tmp_path}']
    r = launch(*args, *(['--summary'] if summary else []))
    assert_one_error_line(r, "model 'simplenn'", 'at least 12x12', 'gets 8x8', 'image_size=12')


# --- In process ---------------------------------------------------------------------------


def test_default_and_experiment_configs_pass_the_checks():
    check_config(default.get_config())
    for path in sorted((ROOT / 'configs').glob('[!_]*.py')):
        module = importlib.import_module(f'configs.{path.stem}')
        for variant in getattr(module, 'VARIANTS', (None,)):
            config = module.get_config() if variant is None else module.get_config(variant)
            check_config(config)


BAD_VALUES = {
    'val_fraction': [-0.1, 1.0],
    'data_seed': [-1],
    'image_size': [-8],
    'max_train_examples': [0],
    'max_eval_examples': [-1],
    'device_memory_budget_gb': [-1.0],
    'augment.crop_padding': [-1],
    'augment.rotation_degrees': [-5.0],
    'augment.scale': [1.0],
    'augment.mixup_alpha': [-0.2, float('nan')],
    'augment.cutmix_alpha': [-1.0],
    'augment.mix_prob': [1.5, -0.1],
    'augment.switch_prob': [2.0],
    'num_epochs': [0, -3],
    'batch_size': [0, -4],
    'eval_batch_size': [0],
    'learning_rate': [0.0, -0.1, float('nan'), float('inf')],
    'momentum': [1.0, -0.5],
    'b1': [-0.1],
    'b2': [1.0],
    'eps': [0.0],
    'weight_decay': [-1e-4],
    'warmup_epochs': [-1.0],
    'step_epochs': [(0,), (5, -1)],
    'step_factor': [0.0],
    'grad_clip_norm': [0.0],
    'grad_accum_steps': [0, -2],
    'ema_decay': [1.0, -0.1],
    'backbone_lr_factor': [-1.0],
    'label_smoothing': [1.0],
    'sanity_loss_tolerance': [0.0],
    'early_stopping.patience': [-1],
    'early_stopping.min_delta': [-0.1],
    'evals_per_epoch': [0, -1],
    'seed': [-1],
    'log_every_steps': [0],
    'checkpoint_every_epochs': [0],
    'keep_checkpoints': [0],
    'steps_per_epoch': [0],
    'profile_steps': [-1],
    'input_mode': ['disk'],
    'model': ['resnet9000'],
    'dtype': ['float16'],
    'init': ['xavier'],
    'optimizer': ['lbfgs'],
    'schedule': ['linear'],
    'weight_decay_mode': ['both'],
    'loss': ['hinge'],
}


def test_every_checked_key_has_a_bad_value_here():
    assert {k for k, *_ in RULES} | {k for k, *_ in CHOICES} <= set(BAD_VALUES)


@pytest.mark.parametrize('key, value', [(k, v) for k, values in BAD_VALUES.items() for v in values])
def test_a_nonsense_value_is_named(key, value):
    config = default.get_config()
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
        node = node[p]
    with config.unlocked():
        node[leaf] = value
    with pytest.raises(ConfigError, match=rf'\b{leaf}\b'):
        check_config(config)


def test_min_square_size_and_model_name():
    simplenn = create_model('simplenn', 10)
    assert model_name(simplenn) == 'simplenn'
    assert model_name(create_model('resnet20', 10)) == 'resnet20'
    assert min_square_size(simplenn, 3) == 12
    check_input_size(simplenn, (12, 12, 3))
    with pytest.raises(ConfigError, match=r"'simplenn' needs inputs of at least 12x12.*11x11"):
        check_input_size(simplenn, (11, 11, 3))
    # 'same' padding never empties a ResNet's map: any size fits.
    check_input_size(create_model('resnet18', 10), (2, 2, 3))
