"""benchmarks.profile_step and benchmarks.conv_layers: op-kind classification, wall split
and tables (no timing asserted)."""

import collections
import os

import pytest

from benchmarks import conv_layers, profile_step
from benchmarks.cases import CASES
from cnn_jax import summary
from cnn_jax.models import create_model


def test_hlo_ops_fall_into_their_kinds():
    kinds = profile_step._JAX_KINDS
    default = 'elementwise loop fusions'
    assert profile_step._kind('transpose_copy_fusion.31', kinds, default) == (
        'transposes and layout copies'
    )
    assert profile_step._kind('wrapped_reduce-window.7', kinds, default).startswith('reductions')
    assert profile_step._kind('add_maximum_fusion.11', kinds, default) == default


def test_torch_ops_fall_into_their_kinds():
    kinds = profile_step._TORCH_KINDS
    assert profile_step._kind('aten::convolution_backward', kinds, 'x') == (
        'convolution backward (dW + dx)'
    )
    assert profile_step._kind('aten::native_batch_norm', kinds, 'x').startswith('BatchNorm')
    assert profile_step._kind('aten::threshold_backward', kinds, 'x') == 'ReLU backward'
    assert profile_step._kind('aten::empty', kinds, 'other') == 'other'


def test_table_sorts_rows_and_gives_shares():
    text = profile_step.table('t', {'a': 1.0, 'b': 3.0})
    rows = text.splitlines()
    assert rows[0] == '### t'
    assert rows[4:] == ['| b | 3.0 | 75% |', '| a | 1.0 | 25% |', '| total | 4.0 | 100% |']


def test_wall_is_shared_among_concurrent_ops_and_gaps_are_no_op():
    ops = [(0, 10, 'a'), (5, 15, 'b'), (12, 14, 'b')]
    executions = [(0, 20), (2, 18)]  # Nested executions count once.
    assert profile_step.wall_by_kind(ops, executions) == {
        'a': 5 + 5 / 2,
        'b': 5 / 2 + 5,  # Two b's alone at 12-14 share it with each other: still b's.
        profile_step.NO_OP: 5,
    }
    assert profile_step.wall_by_kind(ops, []) == {'a': 7.5, 'b': 7.5}


@pytest.mark.slow
def test_trace_profile_of_a_small_model_accounts_for_the_step():
    ms = profile_step.jax_profile('simplenn', steps=2)
    assert ms[profile_step.OUTSIDE] >= 0
    # oneDNN's calls, or on 8 test devices XLA's convolutions (their dispatch).
    assert sum(v for k, v in ms.items() if 'convolution' in k) > 0


@pytest.mark.parametrize('model', sorted(conv_layers.CONVS))
def test_conv_table_lists_the_models_convolutions(model):
    """Each entry's (map size, in, out, count) is the model's, at the benchmark's input."""
    case = CASES[model]
    rows, _ = summary.layer_rows(create_model(model, case.num_classes), case.input_shape)
    convs = [r for r in rows if r.kind == 'Conv2d']
    ours = collections.Counter()
    for count, size, cin, cout, *_ in conv_layers.CONVS[model]:
        ours[size, cin, cout] += count
    assert ours == collections.Counter(
        (r.input_shape[1], r.input_shape[-1], r.output_shape[-1]) for r in convs
    )


@pytest.mark.slow
def test_conv_table_command_times_each_convolution(capsys):
    pytest.importorskip('torch')
    assert conv_layers.main(['--model', 'resnet20', '--reps', '1', '--rounds', '1']) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 + len(conv_layers.CONVS['resnet20']) + 1
    cells = [[float(c) for c in row.split('|')[2:4]] for row in rows[2:]]
    counts = [conv[0] for conv in conv_layers.CONVS['resnet20']]
    for column in (0, 1):
        weighted = sum(n * c[column] for n, c in zip(counts, cells[:-1], strict=True))
        assert cells[-1][column] == pytest.approx(weighted, abs=1)  # The sum row, rounded.


def test_onednn_verbose_sums_each_primitive_per_step():
    """Exact figures from oneDNN 3.13's and 3.2's line formats, only between the markers."""
    from benchmarks import onednn_verbose as ov

    shape = 'mb2_ic3oc4_ih8oh8kh3sh1dh0ph1_iw8ow8kw3sw1dw0pw1'
    new = 'onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_training,'
    old = 'onednn_verbose,exec,cpu,convolution,jit:avx2,backward_weights,'
    lines = [
        f'{new}src,,alg,{shape},9.0',  # before the measured steps
        ov._BEGIN,
        f'{new}src,,alg,{shape},1.5',
        f'{new}src,,alg,{shape},2.5',
        f'{old}src,attr,alg,{shape},3.0',
        'onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src dst,,,4x3x3x3,0.5',
        'onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src wei dst,,,8x4:4x2,0.25',
        ov._END,
        f'{old}src,attr,alg,{shape},7.0',
    ]
    got = ov.per_step_ms([lines], steps=2)
    # Start timestamps (ONEDNN_VERBOSE_TIMESTAMP=1), in both formats: 3.13's after 'v1',
    # 3.2's before 'exec'. Spans [0, 4) and [2, 5) overlap: 5 ms of wall, 2.5 a step.
    timed = [
        ov._BEGIN,
        f'onednn_verbose,v1,100.0,primitive,exec,cpu,convolution,x,forward_training,a,,b,{shape},4.0',
        f'onednn_verbose,102.0,exec,cpu,convolution,x,backward_weights,a,,b,{shape},3.0',
        ov._END,
    ]
    assert ov.busy_ms(timed, steps=2) == 2.5
    assert got == {
        ('convolution forward_training (brg_conv_fwd:avx2)', shape): [2.0, 1.0],
        ('convolution backward_weights (jit:avx2)', shape): [1.5, 0.5],
        ('reorder', ''): [0.25, 0.5],
        ('gemm (XLA)', '8x4:4x2'): [0.125, 0.5],
    }


def test_onednn_verbose_takes_the_median_call_over_rounds():
    """A call the OS delayed (9 ms among 1 ms calls) leaves the row at the median's; the
    mean over every call keeps it."""
    from benchmarks import onednn_verbose as ov

    line = 'onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx2,forward_training,a,,b,s,'
    rounds = [[ov._BEGIN, f'{line}1.0', f'{line}1.0', ov._END]]
    rounds.append([ov._BEGIN, f'{line}1.0', f'{line}9.0', ov._END])
    key = ('convolution forward_training (jit:avx2)', 's')
    assert ov.per_step_ms(rounds, steps=2) == {key: [1.0, 1.0]}
    assert ov.per_step_ms(rounds[1:], steps=1) == {key: [10.0, 2.0]}  # median 5.0, 2 calls
    assert ov.mean_ms(rounds, steps=2) == 3.0  # 12 ms over 2 rounds of 2 steps


@pytest.mark.slow
def test_onednn_verbose_command_tables_both_sides(capsys, monkeypatch):
    """python -m benchmarks.onednn_verbose: the same convolution timed in both steps (its
    children on one device, as a user's are: oneDNN serves one-device runs)."""
    from benchmarks import onednn_verbose
    from cnn_jax.models import onednn_conv

    if not onednn_conv.available():
        pytest.skip('oneDNN wheels not installed (pip install -r requirements-onednn.txt)')
    pytest.importorskip('torch')
    flags = os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8', '')
    monkeypatch.setenv('XLA_FLAGS', flags)
    assert onednn_verbose.main(['--model', 'tiny', '--steps', '2', '--rounds', '2']) == 0
    rows = capsys.readouterr().out.splitlines()
    (forward,) = [r for r in rows if r.startswith('| convolution forward_training')]
    jax_cell, torch_cell = forward.split('|')[3:5]
    assert jax_cell.strip().endswith('(1)') and torch_cell.strip().endswith('(1)')
