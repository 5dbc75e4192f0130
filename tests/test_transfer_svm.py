"""The frozen-feature + linear SVM task (cnn_jax.transfer.svm), end to end on digits.

The backbone is 'pretrained' by the test itself: a narrow torchvision-layout ResNet
trained a few steps on all ten digits, exported as a torchvision state_dict, then used
frozen for '3' vs rest.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import steps
from cnn_jax.data import load_dataset
from cnn_jax.data.augment import preprocess
from cnn_jax.errors import ConfigError
from cnn_jax.models import create_model
from cnn_jax.transfer import compare, svm, weights
from configs import default

SIZE = 32  # digits are 8x8; resized on the device like ImageNet backbones at 224.


def base_config():
    c = default.get_config()
    c.dataset = 'digits'
    c.model = 'resnet'
    c.model_options.stage_sizes = (1, 1, 1, 1)
    c.model_options.width = 8
    c.image_size = SIZE
    c.eval_batch_size = 256
    return c


def he_variables(model, channels=1):
    """He-normal convs and dense, identity BN: an init without compiling the real one."""
    x = jnp.zeros((1, SIZE, SIZE, channels))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(0)

    def draw(path, s):
        name = path[-1].key
        if name == 'kernel':
            fan_in = int(np.prod(s.shape[:-1]))
            return rng.normal(0, np.sqrt(2.0 / fan_in), s.shape).astype(np.float32)
        return np.full(s.shape, 1.0 if name in ('scale', 'var') else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A backbone trained for 30 SGD steps on 10-class digits, saved as torchvision .npz."""
    config = base_config()
    ds = load_dataset(config)
    model = create_model('resnet', ds.num_classes, **config.model_options)
    config.optimizer = 'momentum'
    config.learning_rate = 0.05
    variables = he_variables(model)
    from cnn_jax import optim

    tx = optim.build_optimizer(config, 30)
    state = steps.TrainState.create(
        apply_fn=model.apply,
        params=variables['params'],
        tx=tx,
        batch_stats=variables['batch_stats'],
    )
    step = jax.jit(steps.train_step)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(30):
        idx = rng.choice(len(ds.train), 64, replace=False)
        batch = {
            'image': preprocess(ds.train.images[idx], ds.mean, ds.std, SIZE),
            'label': jnp.asarray(ds.train.labels[idx]),
        }
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m['loss']) / float(m['count']))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # It learnt something.
    path = tmp_path_factory.mktemp('weights') / 'digits_resnet.npz'
    weights.export_torchvision(
        {'params': state.params, 'batch_stats': state.batch_stats}, str(path)
    )
    return str(path)


def svm_config(path):
    c = base_config()
    c.task = 'svm'
    c.pretrained = path
    c.one_vs_rest = '3'
    return c


def test_svm_end_to_end_and_feature_cache(pretrained, tmp_path):
    workdir = tmp_path / 'svm'
    s = svm.run_svm(svm_config(pretrained), str(workdir))
    for f in ('summary.json', 'report.md', 'roc.png', 'confusion_matrix.png'):
        assert (workdir / f).stat().st_size > 0, f
    on_disk = json.loads((workdir / 'summary.json').read_text())
    for k in (
        'accuracy',
        'auc',
        'precision',
        'recall',
        'f1',
        'confusion_matrix',
        'num_train',
        'num_test',
    ):
        assert k in on_disk, k
    assert s['class_names'] == ['not 3', '3'] and s['positive_class'] == '3'
    assert s['num_train'] == 1438 and s['num_test'] == 359  # train + val; digits' test split.
    cm = np.asarray(s['confusion_matrix'])
    assert cm.shape == (2, 2) and cm.sum() == s['num_test']
    assert s['accuracy'] == pytest.approx(np.trace(cm) / cm.sum())
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    assert s['precision'] == pytest.approx(tp / (tp + fp))
    assert s['recall'] == pytest.approx(tp / (tp + fn))
    assert s['feature_dim'] == 64  # width 8 * 2**3, pooled.
    # Features of a briefly trained backbone separate a digit well.
    assert s['auc'] > 0.9
    assert s['accuracy'] > s['majority_accuracy']
    assert '# Frozen resnet features + linear SVM: 3 vs rest' in (workdir / 'report.md').read_text()
    assert not s['features_cached']
    caches = list(workdir.glob('features-*.npz'))
    assert len(caches) == 1

    again = svm.run_svm(svm_config(pretrained), str(workdir))
    assert again['features_cached']
    assert again['accuracy'] == s['accuracy'] and again['auc'] == s['auc']


def test_cache_key_follows_weights_and_data():
    c = svm_config('unused')
    key = svm.feature_cache_key(c, 'digest-a')
    assert svm.feature_cache_key(c, 'digest-a') == key
    assert svm.feature_cache_key(c, 'digest-b') != key
    c.image_size = 16
    assert svm.feature_cache_key(c, 'digest-a') != key
    c.image_size = SIZE
    c.svm = {'C': 10.0}  # SVM options do not change the features.
    assert svm.feature_cache_key(c, 'digest-a') == key


def test_svm_needs_pretrained_weights(tmp_path):
    c = svm_config(None)
    with pytest.raises(ConfigError, match='config.pretrained=PATH'):
        svm.run_svm(c, str(tmp_path))
    c.pretrained = str(tmp_path / 'missing.pth')
    with pytest.raises(ConfigError, match='does not exist'):
        svm.run_svm(c, str(tmp_path))


def test_per_class_comparison_of_a_study(tmp_path):
    classes = ['cat', 'dog', 'ship']
    runs = {
        'finetune': [[0.8, 0.7, 0.9]],
        'scratch': [[0.5, 0.6, 0.7], [0.7, 0.6, 0.9]],  # Two seeds: averaged.
    }
    for variant, accs in runs.items():
        for seed, acc in enumerate(accs):
            d = tmp_path / variant / (f'seed_{seed}' if len(accs) > 1 else '')
            d.mkdir(parents=True, exist_ok=True)
            summary = {'status': 'completed', 'class_names': classes, 'per_class_accuracy': acc}
            (d / 'summary.json').write_text(json.dumps(summary))
    text = compare.write_comparison(tmp_path)
    assert '| class | finetune | scratch | finetune - scratch |' in text
    assert '| dog | 0.7000 | 0.6000 | 0.1000 |' in text
    assert '- scratch: 60.0-80.0%' in text
    assert (tmp_path / 'per_class_accuracy.png').stat().st_size > 0
    assert (tmp_path / 'per_class_accuracy.md').read_text() == text
    with pytest.raises(ConfigError, match='no finished runs'):
        compare.write_comparison(tmp_path, ['missing_variant'])
