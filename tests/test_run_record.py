"""A workdir knows the config that produced it and refuses to mix another into it."""

import json
import pathlib
import subprocess
import sys

import pytest

from cnn_jax import cli, run_record, study, tasks
from cnn_jax.errors import ConfigError
from configs import quickstart
from configs.ablations import make_study
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ['--config=configs/quickstart.py', '--config.num_epochs=1', '--config.steps_per_epoch=2']


def launch(*args):
    return subprocess.run(
        [sys.executable, 'launch.py', *QUICK, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_launch_refuses_a_changed_learning_rate_and_accepts_a_logging_change(
    tmp_path, capsys, monkeypatch
):
    # The runs go through launch.py, as a user types them. The refusal and the reuse, which
    # train nothing, call cli.run, what launch.py calls once its flags are parsed, in this
    # process: two process starts fewer (a real launch's one-line error is
    # tests/test_cli_errors.py's).
    first = launch(f'--workdir={tmp_path}')
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((tmp_path / 'config.json').read_text())
    assert record['config']['learning_rate'] == 0.002
    assert record['command'][1:3] == ['launch.py', QUICK[0]]
    assert record['commit'] is None or len(record['commit'].split('+')[0]) == 40
    before = (tmp_path / 'summary.json').read_text()
    monkeypatch.setattr(cli, 'enable_compilation_cache', lambda: None)  # JAX's global config.

    def relaunch(**overrides):
        config = quickstart.get_config()
        config.update(num_epochs=1, steps_per_epoch=2, **overrides)
        capsys.readouterr()
        return cli.run(config, str(tmp_path)), capsys.readouterr()

    code, out = relaunch(learning_rate=0.5)
    assert code == 2
    assert out.err.strip().count('\n') == 0 and 'Traceback' not in out.err
    assert 'learning_rate: 0.002 there, 0.5 now' in out.err
    assert '--workdir' in out.err and '--restart' in out.err
    assert (tmp_path / 'summary.json').read_text() == before  # Nothing was reported.

    code, out = relaunch(log_every_steps=7)
    assert code == 0, out.err[-2000:]
    assert 'already holds this run' in out.out
    assert (tmp_path / 'summary.json').read_text() == before

    restarted = launch(f'--workdir={tmp_path}', '--config.learning_rate=0.5', '--restart')
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    record = json.loads((tmp_path / 'config.json').read_text())
    assert record['config']['learning_rate'] == 0.5


def test_result_changes_ignores_non_result_keys_and_new_keys_at_their_default():
    recorded = {'learning_rate': 0.1, 'eval_batch_size': 512, 'augment.flip': False}
    current = {'learning_rate': 0.1, 'eval_batch_size': 64, 'augment.flip': False, 'new': 3}
    assert run_record.result_changes(recorded, current, {'new': 3}) == {}
    assert run_record.result_changes(recorded, current, {'new': 4}) == {
        'new': (run_record.ABSENT, 3)
    }
    current['augment.flip'] = True
    assert run_record.result_changes(recorded, current, {'new': 3}) == {
        'augment.flip': (False, True)
    }


def test_a_study_reuses_a_finished_variant_only_if_its_config_matches(tmp_path):
    def config(lr):
        c = tiny_config(num_epochs=1, steps_per_epoch=2)
        return make_study(c, 'lrs', [('a', {'learning_rate': lr}), ('b', {'seed': 1})])

    calls = []

    def run(c, workdir):
        calls.append(pathlib.Path(workdir).name)
        return tasks.run(c, workdir)

    study.run_study(config(0.01), tmp_path, run)
    assert calls == ['a', 'b']
    study.run_study(config(0.01), tmp_path, run)  # Both reused.
    assert calls == ['a', 'b']
    with pytest.raises(ConfigError, match=r'learning_rate: 0.01 there, 0.02 now'):
        study.run_study(config(0.02), tmp_path, run)
    assert calls == ['a', 'b']
