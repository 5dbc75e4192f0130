"""Vectorised runs go through the one training loop: resume and early stopping per variant.

A vectorised group stopped mid-epoch and re-run must end with each variant's numbers equal
(within 1e-5) to its own separate run; a variant that stops early stops alone.
"""

import functools
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnn_jax import experiment, records, study, sweep
from cnn_jax.errors import Interrupted
from configs.ablations import make_study
from tests import conftest
from tests.conftest import tiny_config

EPOCHS, STEPS = 3, 4
LRS = (0.2, 0.05, 0.01)
# Timing, and where a run resumed from, differ by design; `vectorized` marks the group.
VOLATILE = conftest.VOLATILE | {'vectorized'}


def _rows(workdir):
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != 'elapsed_s'} for line in lines]


def _assert_close(got, want, where=''):
    """Same structure; every number within 1e-5."""
    conftest.assert_close(got, want, rel_tol=0, abs_tol=1e-5, where=where)


def _assert_same_run(got: dict, got_dir, want: dict, want_dir, where: str) -> None:
    """Same summary (timing aside) and the same metrics.jsonl rows."""
    _assert_close(
        {k: v for k, v in got.items() if k not in VOLATILE},
        {k: v for k, v in want.items() if k not in VOLATILE},
        f'{where} summary',
    )
    _assert_close(_rows(got_dir), _rows(want_dir), f'{where} metrics.jsonl')


def _lr_study(vectorize: str):
    c = tiny_config(num_epochs=EPOCHS, steps_per_epoch=STEPS, optimizer='momentum')
    c.model_options.dropout_rate = 0.2  # Resuming must replay each variant's masks.
    c.augment.flip = True
    c = make_study(c, 'lrs', [(f'lr_{lr}', {'learning_rate': lr}) for lr in LRS])
    c.vectorize = vectorize
    return c


@pytest.mark.slow
def test_interrupted_vectorized_study_resumes_to_three_separate_runs(tmp_path, monkeypatch):
    stop_at = STEPS + 2  # Mid-epoch 2, as a SIGTERM would.
    vec, seq = tmp_path / 'vec', tmp_path / 'seq'
    with monkeypatch.context() as m:
        m.setattr(
            sweep,
            'run_vectorized',
            functools.partial(sweep.run_vectorized, hooks=[lambda step: step == stop_at]),
        )
        with pytest.raises(Interrupted, match=f'interrupted at step {stop_at};'):
            study.run_study(_lr_study('true'), vec)
    for lr in LRS:  # Each variant saved its own checkpoint, and no summary yet.
        assert (vec / f'lr_{lr}' / 'checkpoints' / 'latest' / str(stop_at)).is_dir()
        assert not (vec / f'lr_{lr}' / 'summary.json').exists()
    study.run_study(_lr_study('true'), vec)
    study.run_study(_lr_study('false'), seq)
    for k, lr in enumerate(LRS):
        name = f'lr_{lr}'
        got, want = records.read_summary(vec / name), records.read_summary(seq / name)
        assert got['vectorized'] == {'k': 3, 'index': k}
        assert got['resumed_from_step'] == stop_at
        assert 'vectorized' not in want and want['resumed_from_step'] is None
        assert got['epochs_run'] == EPOCHS
        _assert_same_run(got, vec / name, want, seq / name, name)
        for output in ('report.md', 'curves.png', 'confusion_matrix.png', 'config.json'):
            assert (vec / name / output).stat().st_size > 0, (name, output)
    assert records.read_summary(vec / 'lr_0.2')['test_loss'] != pytest.approx(
        records.read_summary(vec / 'lr_0.01')['test_loss'], abs=1e-3
    )  # The variants really differ.


def _latest_params(workdir, step):
    path = workdir / 'checkpoints' / 'latest' / str(step) / 'state'
    return jax.device_get(ocp.StandardCheckpointer().restore(path.absolute())['params'])


@pytest.mark.slow
def test_a_variant_stops_early_alone_and_reports_its_best_epoch(tmp_path):
    """Adam at 1e-5 cannot lower val_loss by min_delta: it stops after epoch 2, keeping
    epoch 1's weights, while 3e-3 trains all four epochs; a stop in epoch 3 and re-run
    gives each its separate run."""
    epochs, steps = 4, 3
    config = tiny_config(num_epochs=epochs, steps_per_epoch=steps)  # Adam.
    config.early_stopping.patience = 1
    config.early_stopping.monitor = 'val_loss'
    config.early_stopping.min_delta = 0.02
    variants = [{'learning_rate': 3e-3}, {'learning_rate': 1e-5}]
    dirs = [tmp_path / f'vec_{k}' for k in range(len(variants))]
    stop_at = 2 * steps + 2  # After the slow variant stopped.
    with pytest.raises(Interrupted):
        sweep.run_vectorized(config, variants, dirs, hooks=[lambda step: step == stop_at])
    outs = sweep.run_vectorized(config, variants, dirs)
    fast, slow = outs
    assert not fast['stopped_early'] and fast['epochs_run'] == epochs
    assert slow['stopped_early'] and slow['epochs_run'] == 2 and slow['best_epoch'] == 1
    assert [o['resumed_from_step'] for o in outs] == [stop_at, stop_at]
    best_row = _rows(dirs[1])[0]  # Its summary evaluates the weights of its best epoch.
    assert slow['val_loss'] == pytest.approx(best_row['val_loss'], abs=1e-5)
    assert slow['val_accuracy'] == pytest.approx(best_row['val_accuracy'], abs=1e-5)
    for k, vc in enumerate(sweep.variant_configs(config, variants)):
        seq_dir = tmp_path / f'seq_{k}'
        _assert_same_run(outs[k], dirs[k], experiment.run(vc, seq_dir), seq_dir, f'variant {k}')
    # The stopped variant's state stopped changing: its last checkpoint (saved with the
    # fast variant's at step 12) holds what its separate run saved when it stopped.
    frozen = _latest_params(dirs[1], epochs * steps)
    at_stop = _latest_params(tmp_path / 'seq_1', 2 * steps)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=0), frozen, at_stop)
