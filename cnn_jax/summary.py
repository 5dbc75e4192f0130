"""Parameter counts and the per-layer table that `launch.py --summary` prints.

The table lists every leaf layer (a module without sub-modules) in call order, as
torchsummary does: type, output shape, the parameters the module holds, and the count
that cnn_jax.arithmetic's formulas give for a layer of that kind and shape. A layer whose
count disagrees with its formula raises ParamCountMismatch. Batch-norm running statistics
('batch_stats') are non-trainable state, listed in their own column and total.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from cnn_jax import arithmetic
from cnn_jax.models import layers, pooling
from cnn_jax.models.input_size import check_input_size, trace_init


class ParamCounts(NamedTuple):
    """Parameter counts as torchsummary gives them, plus the batch-norm statistics.

    Every Flax 'params' leaf is trainable (freezing happens in the optimiser), so
    total == trainable and non_trainable == 0; BN running statistics are state, not
    parameters, and are counted apart in `batch_stats`.
    """

    total: int
    trainable: int
    non_trainable: int
    batch_stats: int


class LayerRow(NamedTuple):
    """One row of the layer table."""

    name: str  # Module path, '/'-joined ('layer1_0/conv1').
    kind: str  # torch-style type name ('Conv2d', 'BatchNorm2d', 'ReLU', ...).
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    trainable: int  # What the module holds in 'params'.
    non_trainable: int  # What it holds in 'batch_stats'.
    formula: arithmetic.LayerParams | None  # None: no formula for this kind of layer.


class ParamCountMismatch(RuntimeError):
    """A layer holds a different number of parameters than its formula says."""


def _count(tree: Any) -> int:
    # Works on arrays and on the ShapeDtypeStructs of jax.eval_shape alike.
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def param_counts(variables: Any) -> ParamCounts:
    """Counts 'params' (parameters) and 'batch_stats' (BN state) of a variable dict."""
    trainable = _count(variables.get('params', {}))
    return ParamCounts(trainable, trainable, 0, _count(variables.get('batch_stats', {})))


def count_fields(variables: Any) -> dict[str, int]:
    """`param_counts` as a run's summary and sanity checks record them."""
    counts = param_counts(variables)
    return {
        'total_params': counts.total,
        'trainable_params': counts.trainable,
        'non_trainable_params': counts.non_trainable,
        'batch_norm_statistics': counts.batch_stats,
    }


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            return {}
        tree = tree[key]
    return tree


def _tuple(value: Any, n: int) -> tuple[Any, ...]:
    if value is None:
        return (1,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)


def _padding(padding: Any, n: int) -> list[arithmetic.PaddingArg] | None:
    """flax's padding argument as one arithmetic padding per axis (None: not checkable)."""
    if isinstance(padding, str):
        return [padding.lower()] * n if padding.upper() in ('SAME', 'VALID') else None
    if isinstance(padding, int):
        return [padding] * n
    pads = list(padding)
    if len(pads) != n:
        return None
    return [p if isinstance(p, int) else (int(p[0]), int(p[1])) for p in pads]


def _check_spatial(
    row_name: str,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    kernel: Sequence[int],
    strides: Sequence[int],
    padding: list[arithmetic.PaddingArg] | None,
    dilation: Sequence[int],
) -> None:
    """The output size formula must give the shape the layer produced."""
    if padding is None:
        return
    n = len(kernel)
    expected = tuple(
        arithmetic.conv_output_size(in_shape[1 + a], kernel[a], strides[a], padding[a], dilation[a])
        for a in range(n)
    )
    got = tuple(out_shape[1 : 1 + n])
    if expected != got:
        raise ParamCountMismatch(f'{row_name}: output size {got} but the formula gives {expected}')


def _describe(
    module: nn.Module, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> tuple[str, arithmetic.LayerParams | None]:
    """(type name, formula count) of a leaf layer; checks conv and pool output sizes."""
    spatial = len(in_shape) - 2
    if isinstance(module, nn.Conv):
        kernel, n = module.kernel_size, len(module.kernel_size)
        strides, dilation = _tuple(module.strides, n), _tuple(module.kernel_dilation, n)
        _check_spatial(
            name, in_shape, out_shape, kernel, strides, _padding(module.padding, n), dilation
        )
        count = arithmetic.conv_params(
            kernel, in_shape[-1], module.features, module.use_bias, module.feature_group_count
        )
        return f'Conv{n}d', arithmetic.LayerParams(count)
    if isinstance(module, nn.Dense):
        return 'Linear', arithmetic.LayerParams(
            arithmetic.dense_params(in_shape[-1], module.features, module.use_bias)
        )
    if isinstance(module, nn.BatchNorm):
        channels = in_shape[module.axis] if isinstance(module.axis, int) else None
        if channels is None:
            return f'BatchNorm{max(spatial, 1)}d', None
        formula = arithmetic.batchnorm_params(channels, module.use_scale, module.use_bias)
        return f'BatchNorm{max(spatial, 1)}d', formula
    if isinstance(module, pooling.MaxPool | pooling.AvgPool):
        window, n = tuple(module.window), len(module.window)
        strides, padding = tuple(module.strides or window), _padding(module.padding, n)
        _check_spatial(name, in_shape, out_shape, window, strides, padding, (1,) * n)
        kind = 'MaxPool' if isinstance(module, pooling.MaxPool) else 'AvgPool'
        return f'{kind}{len(window)}d', arithmetic.LayerParams(0)
    if isinstance(module, nn.Dropout):
        kind = 'Dropout2d' if tuple(module.broadcast_dims) == (1, 2) else 'Dropout'
        return kind, arithmetic.LayerParams(0)
    if isinstance(module, layers.Activation):
        return layers.ACTIVATIONS[module.fn][1], arithmetic.LayerParams(0)
    if isinstance(module, layers.Flatten | pooling.GlobalAvgPool):
        return type(module).__name__, arithmetic.LayerParams(0)
    return type(module).__name__, None


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, 'shape') else ()


def _batch_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    return (1, *shape) if len(shape) == 3 else shape


def layer_rows(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[LayerRow], ParamCounts]:
    """The rows of the layer table and the model's parameter counts.

    Raises ParamCountMismatch if a layer breaks its formula, ConfigError if the input is
    too small for the model (see models.input_size). input_shape is (H, W, C) or
    (N, H, W, C). Only shapes are computed (jax.eval_shape): no parameters are
    materialised, so a ResNet-50 at 224x224 costs almost nothing.
    """
    check_input_size(model, input_shape)  # Every run traces here first: say what size fits.
    shape = _batch_shape(input_shape)
    calls: list[tuple[nn.Module, tuple[str, ...], tuple[int, ...], tuple[int, ...]]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__':
            module = context.module
            in_shape = _shape(args[0]) if args else ()
            calls.append((module, tuple(module.path), in_shape, _shape(out)))
        return out

    variables = trace_init(model, shape, record)
    params = variables.get('params', {})
    stats = variables.get('batch_stats', {})
    # Leaves: calls whose module path is no other call's proper prefix.
    parents = {path[:i] for _, path, _, _ in calls for i in range(len(path))}
    rows = []
    for module, path, in_shape, out_shape in calls:
        if path in parents:
            continue
        name = '/'.join(path)
        kind, formula = _describe(module, name, in_shape, out_shape)
        held = _count(_subtree(params, path)), _count(_subtree(stats, path))
        row = LayerRow(name, kind, in_shape, out_shape, *held, formula)
        if formula is not None and (row.trainable, row.non_trainable) != tuple(formula):
            raise ParamCountMismatch(
                f'{name} ({kind}): the module holds {row.trainable} parameters and '
                f'{row.non_trainable} statistics, the formula gives {formula.trainable} and '
                f'{formula.non_trainable}'
            )
        rows.append(row)
    counts = param_counts(variables)
    held = sum(r.trainable for r in rows), sum(r.non_trainable for r in rows)
    if held != (counts.trainable, counts.batch_stats):
        # A composite module declared variables of its own: list them rather than lose them.
        rest = counts.trainable - held[0], counts.batch_stats - held[1]
        rows.append(LayerRow('(non-leaf modules)', '-', (), (), *rest, None))
    return rows, counts


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return '[' + ', '.join(['-1', *map(str, shape[1:])]) + ']' if shape else '-'


def layer_table(model: nn.Module, input_shape: Sequence[int]) -> str:
    """torchsummary-style table: one row per layer, then the parameter totals.

    Columns: Layer (type), Output Shape (batch as -1, NHWC), Param # (trainable, held by
    the module), Formula # (cnn_jax.arithmetic's count), BN stats # (running mean and
    variance: state, not parameters). Ends with the lines 'Total params: N',
    'Trainable params: N', 'Non-trainable params: N'.
    """
    rows, counts = layer_rows(model, input_shape)

    header = ('Layer (type)', 'Output Shape', 'Param #', 'Formula #', 'BN stats #')
    body = [
        (
            f'{r.name} ({r.kind})',
            _fmt_shape(r.output_shape),
            f'{r.trainable:,}',
            '-' if r.formula is None else f'{r.formula.trainable:,}',
            f'{r.non_trainable:,}' if r.non_trainable else '',
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cols: Sequence[str]) -> str:
        # Text columns align left, numbers right, as in torchsummary.
        left = f'{cols[0]:<{widths[0]}}  {cols[1]:<{widths[1]}}'
        right = '  '.join(f'{c:>{w}}' for c, w in zip(cols[2:], widths[2:], strict=True))
        return f'{left}  {right}'.rstrip()

    width = sum(widths) + 2 * (len(widths) - 1)
    lines = ['-' * width, fmt(header), '=' * width, *map(fmt, body), '=' * width]
    lines += [
        f'Input shape: {_fmt_shape(_batch_shape(input_shape))}',
        f'Batch-norm statistics (state, not parameters): {counts.batch_stats:,}',
        '-' * width,
        f'Total params: {counts.total:,}',
        f'Trainable params: {counts.trainable:,}',
        f'Non-trainable params: {counts.non_trainable:,}',
    ]
    return '\n'.join(lines)
