"""E5a: a frozen pretrained backbone's pooled features -> a linear SVM (scikit-learn).

`run_svm(config, workdir)` (config.task == 'svm') loads config.model with the torchvision
weights config.pretrained, extracts the pooled features (eval mode) of train (+ val) and
test, cached in the workdir as features-<key>.npz (a hash of the weights file and the
data/model config), fits StandardScaler + LinearSVC on train (+ val), evaluates on test
and writes summary.json, report.md, roc.png and confusion_matrix.png. With
config.one_vs_rest the labels are {0: rest, 1: class}. LinearSVC's options come from config.svm.
"""

import functools
import hashlib
import json
import pathlib
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from cnn_jax import parallel, records, report
from cnn_jax.data import load_dataset
from cnn_jax.data.augment import preprocess
from cnn_jax.data.metadata import model_input_shape
from cnn_jax.errors import ConfigError
from cnn_jax.models import build_model
from cnn_jax.records import Reporter
from cnn_jax.transfer.weights import check_exists, load_torchvision

# Config keys that change the features (the cache key hashes them with the weights file).
FEATURE_KEYS = tuple(
    'dataset data_dir classes label_groups one_vs_rest image_size normalize val_fraction '
    'data_seed max_train_examples model model_options dtype'.split()
)
CACHE_VERSION = 1


# --- Features ---------------------------------------------------------------------------


def feature_cache_key(config: ml_collections.ConfigDict, weights_digest: str) -> str:
    """A short hash of the weights file digest and the config keys that shape the features."""

    def plain(v: Any) -> Any:
        return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v

    keys = {k: plain(config.get(k)) for k in FEATURE_KEYS}
    text = json.dumps([CACHE_VERSION, weights_digest, keys], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def extract_features(
    model: Any,
    variables: dict,
    images: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    image_size: int | None,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> np.ndarray:
    """Pooled features (N, D) of uint8 NHWC `images`, in jitted batches over all devices.

    The batch is rounded up to a multiple of the device count; the last one is padded.
    """
    n_dev = mesh.devices.size
    batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    @jax.jit
    def features(variables, batch):
        x = preprocess(batch, mean, std, image_size)
        return model.apply(variables, x, train=False, features_only=True)

    variables = jax.device_put(variables, parallel.replicated(mesh))
    shard = parallel.data_sharding(mesh)
    out, pending = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        n = len(batch)
        if n < batch_size:
            pad = np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        pending.append((features(variables, jax.device_put(batch, shard)), n))
        if len(pending) > 2:  # Keep the device busy while earlier results come back.
            f, k = pending.pop(0)
            out.append(parallel.to_host(f)[:k])
    out += [parallel.to_host(f)[:k] for f, k in pending]  # Gathered across processes too.
    return np.concatenate(out).astype(np.float32)


def load_or_extract(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[dict[str, np.ndarray], bool]:
    """Train (+ val) and test features with labels and class names; True if from cache."""
    check_exists(config.pretrained, config.model)
    weights = pathlib.Path(config.pretrained).expanduser()
    with weights.open('rb') as f:
        key = feature_cache_key(config, hashlib.file_digest(f, 'sha256').hexdigest())
    cache = workdir / f'features-{key}.npz'
    if cache.exists():
        Reporter().line(f'SVM: features from the cache {cache}')
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}, True

    ds = load_dataset(config)
    # No model selection here: the SVM trains on train + val.
    fit_splits = [ds.train] + ([ds.val] if ds.val is not None else [])
    train_images = np.concatenate([s.images for s in fit_splits])
    train_labels = np.concatenate([s.labels for s in fit_splits])
    model = build_model(config, ds.num_classes)
    # Every backbone tensor comes from the file, so the variables need only their shapes
    # (no init to compile); a replaced head stays abstract and is dropped: it is unused.
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(config.seed),
        jnp.zeros((1, *model_input_shape(config, ds)), jnp.float32),
    )
    loaded = load_torchvision(str(weights), abstract, arch=config.model)
    variables = {}
    for collection in ('params', 'batch_stats'):
        leaves = traverse_util.flatten_dict(loaded.get(collection, {}))
        concrete = {k: v for k, v in leaves.items() if not isinstance(v, jax.ShapeDtypeStruct)}
        variables[collection] = traverse_util.unflatten_dict(concrete)

    mesh = parallel.make_mesh()
    t0 = time.time()
    size, batch = config.image_size, config.eval_batch_size
    arrays = {
        f'{split}_features': extract_features(
            model, variables, images, ds.mean, ds.std, size, batch, mesh
        )
        for split, images in (('train', train_images), ('test', ds.test.images))
    }
    Reporter().line(
        f'SVM: extracted {len(train_images)} + {len(ds.test)} features of dimension '
        f'{arrays["train_features"].shape[1]} in {time.time() - t0:.1f} s on '
        f'{mesh.devices.size} {jax.devices()[0].platform} device(s)'
    )
    arrays.update(
        train_labels=train_labels.astype(np.int32),
        test_labels=ds.test.labels.astype(np.int32),
        class_names=np.asarray(ds.class_names),
    )
    if parallel.is_main_process():  # Only process 0 writes files.
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix('.tmp.npz')
        np.savez(tmp, **arrays)
        tmp.replace(cache)
    return arrays, False


# --- SVM and report ---------------------------------------------------------------------


def fit_svm(
    train_x: np.ndarray, train_y: np.ndarray, svm: ml_collections.ConfigDict, seed: int
) -> Any:
    """StandardScaler + LinearSVC fitted on the features; convergence warnings logged."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    clf = make_pipeline(
        StandardScaler(),
        LinearSVC(
            C=float(svm.C),
            class_weight=svm.class_weight,
            max_iter=int(svm.max_iter),
            random_state=seed,
        ),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ConvergenceWarning)
        clf.fit(train_x, train_y)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            Reporter().warn(f'SVM: {w.message} (raise config.svm.max_iter)')
    return clf


def roc_curves(y_true: np.ndarray, scores: np.ndarray, num_classes: int) -> dict:
    """ROC (fpr, tpr, auc) per positive class: class 1 if binary, else one-vs-rest each."""
    from sklearn.metrics import auc, roc_curve

    if num_classes == 2:
        pairs = {1: scores if scores.ndim == 1 else scores[:, 1]}
    else:
        pairs = {k: scores[:, k] for k in range(num_classes)}
    curves = {}
    for k, s in pairs.items():
        positive = y_true == k
        if positive.all() or not positive.any():
            continue  # ROC undefined without both classes.
        fpr, tpr, _ = roc_curve(positive, s)
        curves[k] = (fpr, tpr, float(auc(fpr, tpr)))
    return curves


def plot_roc(curves: dict, class_names: list[str], path: pathlib.Path, title: str) -> None:
    fig = report.new_figure(5.5, 5)
    ax = fig.subplots()
    for k, (fpr, tpr, a) in curves.items():
        ax.plot(fpr, tpr, lw=1.5, label=f'{class_names[k]} (AUC {a:.3f})')
    ax.plot([0, 1], [0, 1], '--', color='grey', lw=1, label='chance')
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.set(xlabel='false positive rate', ylabel='true positive rate')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _binary_prf(cm: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 of the positive class 1 from a 2x2 confusion matrix."""
    tp, fp, fn = float(cm[1, 1]), float(cm[0, 1]), float(cm[1, 0])
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _write_report(workdir: pathlib.Path, s: dict, config: ml_collections.ConfigDict) -> None:
    names = s['class_names']
    binary = len(names) == 2
    avg = 'of the positive class' if binary else 'macro-averaged'
    parts = [
        f'# Frozen {s["model"]} features + linear SVM'
        + (f': {names[1]} vs rest' if binary else ''),
        '',
        f'Weights `{s["pretrained"]}`; dataset `{s["dataset"]}`; {s["num_train"]} training and '
        f'{s["num_test"]} test images; features of dimension {s["feature_dim"]} '
        f'({"from the cache" if s["features_cached"] else "extracted"}); '
        f'LinearSVC C={s["svm_C"]} on standardised features.',
        '',
        '## Results (test)',
        '',
        report.markdown_table(
            ('metric', 'value'),
            [
                ('accuracy', s['accuracy']),
                ('AUC', s['auc'] if s['auc'] is not None else 'n/a'),
                (f'precision ({avg})', s['precision']),
                (f'recall ({avg})', s['recall']),
                (f'F1 ({avg})', s['f1']),
                ('train accuracy', s['train_accuracy']),
                ('majority-class accuracy', s['majority_accuracy']),
            ],
        ),
        '',
        '![ROC curve](roc.png)',
        '',
        *report.class_sections(names, s['per_class_accuracy'], s['confusion_matrix']),
        *report.code_section('Config', str(config)),
    ]
    (workdir / 'report.md').write_text('\n'.join(parts))


def run_svm(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole E5a task; returns the summary dict (also written to summary.json)."""
    if not config.pretrained:
        raise ConfigError(
            "task 'svm' needs pretrained weights for the frozen backbone: set "
            f'--config.pretrained=PATH to a torchvision state_dict of {config.model} '
            '(.pth/.pt, .safetensors or .npz), e.g. resnet50-0676ba61.pth saved by '
            'torchvision.models.resnet50(weights="IMAGENET1K_V1")'
        )
    t0 = time.time()
    wd = pathlib.Path(workdir)
    data, cached = load_or_extract(config, wd)
    names = [str(n) for n in data['class_names']]
    k = len(names)
    train_x, train_y = data['train_features'], data['train_labels']
    test_x, test_y = data['test_features'], data['test_labels']
    if len(np.unique(train_y)) < 2:
        raise ConfigError('the SVM needs at least two classes in the training split')

    svm = config.svm
    clf = fit_svm(train_x, train_y, svm, config.seed)
    metrics = report.classification_metrics(test_y, clf.predict(test_x), k)
    cm = np.asarray(metrics['confusion_matrix'])
    if k == 2:
        precision, recall, f1 = _binary_prf(cm)
    else:
        precision, recall, f1 = metrics['precision'], metrics['recall'], metrics['f1']
    curves = roc_curves(test_y, clf.decision_function(test_x), k)
    auc = float(np.mean([c[2] for c in curves.values()])) if curves else None

    summary = {
        'status': 'completed',
        'task': 'svm',
        'model': config.model,
        'pretrained': str(config.pretrained),
        'dataset': config.dataset,
        'class_names': names,
        'positive_class': names[1] if k == 2 else None,
        'accuracy': metrics['accuracy'],
        'test_accuracy': metrics['accuracy'],
        'train_accuracy': float(np.mean(clf.predict(train_x) == train_y)),
        'majority_accuracy': float(np.mean(test_y == np.bincount(train_y).argmax())),
        'auc': auc,
        'auc_per_class': {names[c]: v[2] for c, v in curves.items()},
        'precision': precision,
        'recall': recall,
        'f1': f1,
        'per_class_accuracy': metrics['per_class_accuracy'],
        'confusion_matrix': metrics['confusion_matrix'],
        'num_train': len(train_y),
        'num_test': len(test_y),
        'feature_dim': int(train_x.shape[1]),
        'svm_C': float(svm.C),
        'features_cached': cached,
        'num_devices': jax.device_count(),
        'wall_time_s': time.time() - t0,
    }
    if not parallel.is_main_process():  # Only process 0 writes files.
        return summary
    wd.mkdir(parents=True, exist_ok=True)
    title = f'{config.model} features + linear SVM'
    plot_roc(curves, names, wd / 'roc.png', title=f'ROC: {title}')
    report.plot_confusion_matrix(cm, names, wd / 'confusion_matrix.png', title=title)
    _write_report(wd, summary, config)
    records.write_json(wd / 'summary.json', summary)  # Last: it marks the run finished.
    Reporter().line(
        f'completed: SVM test accuracy {summary["accuracy"]:.4f}, AUC '
        f'{"n/a" if auc is None else f"{auc:.4f}"}, precision {precision:.4f}, recall '
        f'{recall:.4f}, F1 {f1:.4f}. Reports in {wd}/ (report.md, summary.json, roc.png, '
        'confusion_matrix.png).'
    )
    return summary
