"""Training from a stream: the device-resident run's numbers; a stop mid-epoch resumes exactly.

A folder of tiny images trains device-resident and streamed, the stream chosen by 'auto'
under a tiny device_memory_budget_gb as a dataset past the budget would be. Both draw the
same batches in the same order through the same compiled steps (augmentation and dropout
on), so the metrics agree to float precision. A streamed run stopped in the middle of an
epoch and re-run ends as the uninterrupted one. Two processes streaming: test_multiprocess.
"""

import pytest

from cnn_jax import experiment, training_loop
from cnn_jax.errors import Interrupted
from tests.conftest import tiny_config
from tests.test_folder_decode import make_folder
from tests.test_stop_anywhere import VOLATILE, assert_close, epoch_rows

STEPS = 3  # Per epoch: 48 of the 60 - 12 (validation) training images, batches of 16.


def config(root, **overrides):
    c = tiny_config(
        dataset=f'folder:{root}',
        batch_size=16,
        eval_batch_size=24,  # 60 test images: a padded last batch.
        steps_per_epoch=None,
        val_fraction=0.2,
        **overrides,
    )
    c.model_options.dropout_rate = 0.2
    c.augment.flip = True
    c.augment.crop_padding = 2
    return c


def streamed(root):
    return config(root, input_mode='auto', device_memory_budget_gb=1e-6)


def results(out, workdir):
    return {k: v for k, v in out.items() if k not in VOLATILE}, epoch_rows(workdir)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """(folder, device-resident results, streamed results, the streamed run's output)."""
    root = make_folder(tmp_path_factory.mktemp('data') / 'imgs', per_class=20)
    base = tmp_path_factory.mktemp('runs')
    device = experiment.run(config(root, input_mode='device'), base / 'device')
    with pytest.MonkeyPatch.context() as mp:
        printed = []
        mp.setattr('builtins.print', lambda *a, **k: printed.append(' '.join(map(str, a))))
        stream = experiment.run(streamed(root), base / 'stream')
    return root, results(device, base / 'device'), results(stream, base / 'stream'), printed


def test_streamed_training_equals_device_resident(runs):
    _, device, stream, printed = runs
    assert any(line.startswith('Input: streamed from the host (') for line in printed)
    assert stream[0]['status'] == 'completed' and [r['epoch'] for r in stream[1]] == [1, 2]
    assert stream[0]['steps_per_epoch'] == STEPS
    assert_close(stream, device)


def test_stop_mid_streamed_epoch_then_rerun_equals_uninterrupted(runs, tmp_path, monkeypatch):
    root, _, stream, _ = runs
    stop_at = STEPS + 2  # In the middle of epoch 2.
    with monkeypatch.context() as m:
        hooked = training_loop.train_and_evaluate

        def stopping(*args, **kwargs):
            return hooked(*args, **kwargs, hooks=[lambda step: step == stop_at])

        m.setattr(experiment, 'train_and_evaluate', stopping)
        with pytest.raises(Interrupted, match=f'interrupted at step {stop_at};'):
            experiment.run(streamed(root), tmp_path)
    out = experiment.run(streamed(root), tmp_path)
    assert out['resumed_from_step'] == stop_at
    assert_close(results(out, tmp_path), stream)
