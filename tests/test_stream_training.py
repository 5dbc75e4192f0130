"""Training from a stream: the device-resident run's numbers, through a stop mid-epoch.

A folder of tiny images trains device-resident, and streamed: the stream chosen by 'auto'
under a tiny device_memory_budget_gb, as a dataset past the budget would be, stopped in the
middle of an epoch and re-run. Both draw the same batches in the same order through the
same compiled steps (augmentation and dropout on) and a resumed stream starts at the
restored step, so the metrics agree to float precision. (One run pair for both checks:
each run costs seconds of CI. Two processes streaming against one: test_multiprocess.)
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


@pytest.mark.slow
def test_streamed_run_stopped_mid_epoch_and_resumed_equals_device_resident(
    tmp_path, monkeypatch, capsys
):
    root = make_folder(tmp_path / 'imgs', per_class=20)
    device = experiment.run(config(root, input_mode='device'), tmp_path / 'device')
    stop_at = STEPS + 2  # In the middle of epoch 2.
    with monkeypatch.context() as m:
        hooked = training_loop.train_and_evaluate

        def stopping(*args, **kwargs):
            return hooked(*args, **kwargs, hooks=[lambda step: step == stop_at])

        m.setattr(experiment, 'train_and_evaluate', stopping)
        with pytest.raises(Interrupted, match=f'interrupted at step {stop_at};'):
            experiment.run(streamed(root), tmp_path / 'stream')
    assert 'Input: streamed from the host (' in capsys.readouterr().out
    out = experiment.run(streamed(root), tmp_path / 'stream')
    assert out['status'] == 'completed' and out['resumed_from_step'] == stop_at
    assert out['steps_per_epoch'] == STEPS and out['epochs_run'] == 2
    assert_close(results(out, tmp_path / 'stream'), results(device, tmp_path / 'device'))


def test_a_streamed_step_reads_each_devices_rows_where_they_lie():
    """perm=None: the batch the stream put on the devices is used where it lies. The
    device-resident step gathers rows of a replicated dataset, which needs no collective
    either; a gather from a *sharded* batch would need an all-gather of its images."""
    import jax
    import numpy as np

    from cnn_jax import parallel, steps
    from cnn_jax.models import build_model

    c = tiny_config(batch_size=16)
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    spec = steps.InputSpec((0.5,), (0.25,))
    plain = steps.plain_steps([c], build_model(c, 10), (8, 8, 1), spec, mesh, 64, 4)
    state, acc = jax.device_put((plain.state, plain.zero_metrics()), parallel.replicated(mesh))
    shard = parallel.data_sharding(mesh)
    images = jax.device_put(np.zeros((16, 8, 8, 1), np.uint8), shard)
    labels = jax.device_put(np.zeros(16, np.int32), shard)
    args = (state, acc, images, labels, None, np.int32(0), plain.rng)
    hlo = plain.evaluation.train.lower(*args).compile().as_text()
    assert 'all-gather' not in hlo
    rows = jax.device_put(np.arange(16, dtype=np.int32)[None], jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, 'data')))  # fmt: skip
    gathered = plain.evaluation.train.lower(*args[:4], rows, *args[5:]).compile().as_text()
    assert 'all-gather' in gathered  # What perm=None avoids.
