"""`python -m benchmarks.gpu_check --out DIR [--tiny]`: does cnn_jax work here, and how fast.

One process runs four steps in order and rewrites DIR/gpu_check.json and
DIR/gpu_check.md (both naming the device) after every figure, so a run cut off by a
time limit still leaves everything it finished:

1. bringup: device, memory, JAX/jaxlib/XLA versions; a real train step of every model of
   cnn_jax.models.MODELS; a bfloat16 step; a vmapped K-variant sweep step.
2. speed: each model against PyTorch in the same process on the same device (eager
   channels_last, AMP where the row is bfloat16; torch.compile), images/s, compile time,
   achieved FLOP/s and percent of the dense peak (benchmarks.cases.PEAK_TFLOPS); for the
   small models also many steps per compiled call (a scan over a chunk of steps).
3. sweep: K = 1, 2, 4, 8 SimpleNN variants as one program against K separate runs.
4. e8: ResNet-20 on CIFAR-10 at the paper's schedule (64k iterations) through launch.py,
   from the archive in .device/, stopped and checkpointed at the deadline; the same
   command again resumes it.

A failing model or step records its error and the run goes on. `--tiny` runs everything
at small shapes and a few steps, bringing up one model per family (CPU, CI:
tests/test_gpu_check.py). A second run into the
same DIR keeps the steps it does not rerun, and E8's earlier invocations.

Runbook for a session with a device (details, times, resuming E8: benchmarks/GPU_RUNBOOK.md).
Here, first `mkdir -p .device && cp ARCHIVE .device/cifar10-jpeg.tar.gz`; then two
device calls (timeout_s 600), the second with carry ['.device/cifar10-jpeg.tar.gz']:

    python -m benchmarks.gpu_check --out $OUT/gpu --budget-s 540 --steps bringup,speed,sweep
    python -m benchmarks.gpu_check --out $OUT/gpu --budget-s 560 --steps e8 --e8-workdir .device/e8
"""

from __future__ import annotations

import os

# JAX would take 75% of the GPU's memory at start: PyTorch shares this process, and E8's
# launch.py child (which inherits this) the device.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import argparse  # noqa: E402 - after the allocator setting, before JAX starts a backend.
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from benchmarks import device_checks, e8_run, gpu_report, train_step, vectorized  # noqa: E402
from benchmarks.cases import CASES, PEAK_TFLOPS, Case  # noqa: E402

STEPS = ('bringup', 'speed', 'sweep', 'e8')
JSON_NAME, MD_NAME = 'gpu_check.json', 'gpu_check.md'
ROW_RESERVE_S = 20.0  # A figure is skipped when less time than this is left.
E8_RESERVE_S = 30.0  # Between E8's deadline and the budget's end: saving, reports.


@dataclasses.dataclass
class Options:
    out: pathlib.Path
    tiny: bool
    steps: tuple[str, ...]
    deadline: float  # time.time() by which the command should end (inf: none).
    e8_budget_s: float  # Seconds E8 may train in this invocation (inf: to the deadline).
    torch_compile: str  # 'auto' | 'yes' | 'no'
    e8_archive: pathlib.Path
    e8_workdir: pathlib.Path
    e8_cache_dir: str | None


class Report:
    """gpu_check.json and gpu_check.md under `out`, rewritten after every change."""

    def __init__(self, out: pathlib.Path, steps: Sequence[str], argv: Sequence[str]):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        path = out / JSON_NAME
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data.update(command='python -m benchmarks.gpu_check ' + ' '.join(argv))
        self.data.setdefault('steps', {})
        for name in steps:  # Rerun steps start over; E8 keeps its earlier invocations.
            old = self.data['steps'].get(name, {})
            fresh = {'status': 'pending', 'rows': []}
            if name == 'e8':
                fresh['invocations'] = old.get('invocations', [])
            self.data['steps'][name] = fresh

    def step(self, name: str) -> dict[str, Any]:
        return self.data['steps'][name]

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        self.data['updated'] = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
        for name, text in (
            (JSON_NAME, json.dumps(self.data, indent=2, default=str) + '\n'),
            (MD_NAME, gpu_report.markdown(self.data)),
        ):
            tmp = self.out / (name + '.tmp')
            tmp.write_text(text)
            tmp.replace(self.out / name)


def error_fields(e: BaseException) -> dict[str, str]:
    """An exception as JSON: one line, and the traceback's end."""
    return {
        'error': f'{type(e).__name__}: {str(e)[:500]}',
        'traceback': ''.join(traceback.format_exception(e))[-3000:],
    }


def figure(
    report: Report, step: str, label: dict[str, Any], fn: Callable[[], dict], opts: Options
) -> None:
    """Appends one row (fn's figures, its error, or a skip) to `step`, then writes. While
    it runs, the step's 'current' names it: what a killed command was doing."""
    rows = report.step(step)['rows']
    if time.time() > opts.deadline - ROW_RESERVE_S:
        rows.append({**label, 'skipped': 'the time budget is spent'})
    else:
        print(f'gpu_check {step}: {label} ...', flush=True)
        report.step(step)['current'] = label
        report.write()
        try:
            rows.append({**label, **fn()})
        except Exception as e:  # noqa: BLE001 - recorded; the next figure still runs
            rows.append({**label, **error_fields(e)})
            print(f'gpu_check {step}: {label} failed: {rows[-1]["error"]}', flush=True)
        del report.step(step)['current']
    report.write()
    gc.collect()
    _release_torch_memory()


def _release_torch_memory() -> None:
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- 1. Bring-up -----------------------------------------------------------------------


def bringup(report: Report, opts: Options) -> None:
    """One train step of every registry model (--tiny: of one per family), a bfloat16 step
    and a vmapped sweep step."""
    batch = 8
    checked: dict[str, str] = {}  # Family -> its first model checked.
    for name, same_as in device_checks.registry_models().items():
        label = {'check': 'train_step', 'model': name}
        family = device_checks.model_family(name)
        if same_as:
            report.step('bringup')['rows'].append({**label, 'same_network_as': same_as})
            continue
        if opts.tiny and family in checked:  # CI's CPU compiles each deep net for minutes.
            skip = f'--tiny: one model per family ({checked[family]} is the {family})'
            report.step('bringup')['rows'].append({**label, 'tiny_skipped': skip})
            continue
        checked.setdefault(family, name)
        case, shape = device_checks.registry_case(name, batch)
        figure(report, 'bringup', label, lambda c=case, s=shape: _check(c, s), opts)
    r20 = CASES['resnet20']
    if opts.tiny:
        r20 = dataclasses.replace(r20, batch_size=batch)
    label = {'check': 'bfloat16_step', 'model': 'resnet20'}
    figure(report, 'bringup', label, lambda: _check(r20, r20.data_shape, 'bfloat16'), opts)
    simplenn = dataclasses.replace(CASES['simplenn'], batch_size=batch)
    label = {'check': 'vmapped_sweep_step', 'model': 'simplenn', 'k': 4}
    figure(report, 'bringup', label, lambda: _check(simplenn, simplenn.data_shape, k=4), opts)


def _check(case: Case, shape, dtype: str = 'float32', k: int = 1) -> dict[str, Any]:
    config = case.config(dtype)
    configs = [config]
    if k > 1:  # Learning rates differ, as a sweep's would.
        configs = [config.copy_and_resolve_references() for _ in range(k)]
        for i, c in enumerate(configs):
            c.learning_rate = config.learning_rate * 0.5**i
    return device_checks.step_check(configs, case.num_classes, shape)


# --- 2. Speed --------------------------------------------------------------------------


def speed_rows(tiny: bool, accelerator: bool) -> list[tuple[Case, str]]:
    """(case, dtype) of every speed row: bfloat16 on accelerators, float32 on CPU, and
    ResNet-50 in both. --tiny: batch 8, resized inputs at 32 (tiny_rows: one per family)."""
    low = 'bfloat16' if accelerator else 'float32'
    names = [
        ('resnet50', 'bfloat16'),
        ('resnet50', 'float32'),
        ('resnet18_224', low),
        ('vgg_e1', low),
        ('resnet20', low),
        ('simplenn', low),
    ]
    rows = []
    for name, dtype in names:
        case = CASES[name]
        if tiny:
            case = dataclasses.replace(
                case, batch_size=8, image_size=32 if case.image_size else None
            )
        rows.append((case, dtype))
    return rows


def tiny_rows(rows: list[tuple[Case, str]]) -> list[tuple[Case, str]]:
    """The last, smallest row of each model family: what --tiny times (CI's CPU compiles
    ResNet-50 for half a minute; the rows of one family run the same code)."""
    lasts = {device_checks.model_family(case.model): (case, dtype) for case, dtype in rows}
    return [row for row in rows if row in lasts.values()]


SCANNED = ('resnet20', 'simplenn')  # Short steps: where dispatch may bound the rate.


def speed(report: Report, opts: Options) -> None:
    """Each speed row against PyTorch, then the scanned-steps rows of the small models."""
    accelerator = jax.devices()[0].platform != 'cpu'
    compile_torch = opts.torch_compile == 'yes' or (opts.torch_compile == 'auto' and not opts.tiny)
    settings = (
        {'steps': 1, 'windows': 1, 'warmup': 1, 'settle_s': 0.0, 'window_s': 0.0}
        if opts.tiny
        else {'steps': 5, 'windows': 3, 'warmup': 2, 'settle_s': 0.1, 'window_s': 0.5}
    )
    report.step('speed')['settings'] = settings
    rows = speed_rows(opts.tiny, accelerator)
    timed = tiny_rows(rows) if opts.tiny else rows
    for case, dtype in rows:
        label = {'model': case.name, 'dtype': dtype}
        if (case, dtype) not in timed:
            skip = '--tiny: one model per family'
            report.step('speed')['rows'].append({**label, 'tiny_skipped': skip})
            continue

        def measure(case=case, dtype=dtype) -> dict[str, Any]:
            row = train_step.measure_case(
                case,
                dtype=dtype,
                torch_mode='eager+compile' if compile_torch else 'eager',
                **settings,
            )
            if not compile_torch:
                row['torch_compile_skipped'] = (
                    '--tiny: inductor compiles for minutes on a CPU'
                    if opts.tiny
                    else '--torch-compile no'
                )
            del row['model'], row['dtype']
            return row

        figure(report, 'speed', label, measure, opts)
    chunk = 4 if opts.tiny else 50
    scan_settings = {'windows': 1, 'window_s': 0.0} if opts.tiny else {}
    report.step('speed')['scan'] = report.step('speed').get('scan', [])
    scanned = [(case, dtype) for case, dtype in timed if case.name in SCANNED]
    for case, dtype in scanned[-1:] if opts.tiny else scanned:  # --tiny: one, the same code.
        label = {'scan_of': case.name, 'dtype': dtype}

        def scan(case=case, dtype=dtype) -> dict[str, Any]:
            return device_checks.scan_speed(case, dtype, chunk, **scan_settings)

        figure(report, 'speed', label, scan, opts)


# --- 3. Vectorised sweep ---------------------------------------------------------------


def sweep(report: Report, opts: Options) -> None:
    """K = 1, 2, 4, 8 SimpleNN variants (--tiny: 1, 2) as one program against K separate
    runs."""
    case, ks = CASES['simplenn'], (1, 2, 4, 8)
    settings = {'steps': 5, 'windows': 3, 'warmup': 2, 'settle_s': 0.1, 'window_s': 0.5}
    if opts.tiny:
        case, ks = dataclasses.replace(case, batch_size=8), (1, 2)
        settings = {'steps': 1, 'windows': 1, 'warmup': 1, 'settle_s': 0.0, 'window_s': 0.0}

    def measure() -> dict[str, Any]:
        result = vectorized.benchmark_vectorized(
            case.config(), case.input_shape, case.num_classes, ks, **settings
        )
        report.step('sweep')['result'] = result
        return {'separate_ips': result['separate_ips'], 'rows': len(result['rows'])}

    figure(report, 'sweep', {'model': case.name}, measure, opts)


# --- 4. E8 -----------------------------------------------------------------------------


def e8(report: Report, opts: Options) -> None:
    """E8 through launch.py until done or the budget's deadline; a rerun resumes it."""
    step = report.step('e8')
    if time.time() > opts.deadline - E8_RESERVE_S - ROW_RESERVE_S:
        step['rows'].append({'skipped': 'the time budget is spent'})
        return
    print(f'gpu_check e8: {e8_run.CONFIG} in {opts.e8_workdir} ...', flush=True)
    try:
        row = e8_run.run_e8(
            opts.e8_archive,
            opts.e8_workdir,
            opts.out / 'e8',
            stop_at=time.time() + opts.e8_budget_s,
            hard_stop_at=opts.deadline - E8_RESERVE_S,
            cache_dir=opts.e8_cache_dir,
            tiny=opts.tiny,
        )
    except Exception as e:  # noqa: BLE001 - recorded like any step's failure
        row = error_fields(e)
    step['rows'].append(row)
    step['invocations'].append({k: row.get(k) for k in ('status', 'wall_s', 'last_step')})
    step['total_wall_s'] = round(sum(i.get('wall_s') or 0 for i in step['invocations']), 1)


STEP_FNS: dict[str, Callable[[Report, Options], None]] = {
    'bringup': bringup,
    'speed': speed,
    'sweep': sweep,
    'e8': e8,
}


def parse_args(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(
        prog='python -m benchmarks.gpu_check',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('--out', required=True, help='output folder (gpu_check.json, .md, e8/)')
    p.add_argument('--tiny', action='store_true', help='small shapes, a few steps (CPU, CI)')
    p.add_argument('--steps', default=','.join(STEPS), help=f'comma-separated, from {STEPS}')
    p.add_argument(
        '--budget-s',
        type=float,
        default=None,
        help='seconds for the whole command: later figures are skipped, and E8 is stopped '
        f'(checkpointed) {E8_RESERVE_S:.0f} s before it ends',
    )
    p.add_argument(
        '--torch-compile',
        default='auto',
        choices=('auto', 'yes', 'no'),
        help='time torch.compile too (auto: except with --tiny)',
    )
    p.add_argument(
        '--e8-budget-s',
        type=float,
        default=None,
        help='seconds E8 may run in this invocation before it is stopped and checkpointed '
        '(once training has begun; default: until the --budget-s deadline)',
    )
    p.add_argument('--e8-archive', default='.device/cifar10-jpeg.tar.gz')
    p.add_argument('--e8-workdir', default=None, help='default OUT/e8/workdir')
    p.add_argument(
        '--e8-cache-dir',
        default='.device/cache',
        help="decoded-array cache of the archive ('' for cnn_jax's default)",
    )
    a = p.parse_args(argv)
    chosen = [s for s in a.steps.split(',') if s]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        p.error(f'unknown step(s) {unknown}; known: {", ".join(STEPS)}')
    steps = tuple(s for s in STEPS if s in chosen)  # Always in the order of STEPS.
    out = pathlib.Path(a.out).resolve()  # E8's launch.py runs in the repository root.
    start = time.time()
    return Options(
        out=out,
        tiny=a.tiny,
        steps=steps,
        deadline=start + a.budget_s if a.budget_s is not None else float('inf'),
        e8_budget_s=a.e8_budget_s if a.e8_budget_s is not None else float('inf'),
        torch_compile=a.torch_compile,
        e8_archive=pathlib.Path(a.e8_archive).resolve(),
        e8_workdir=pathlib.Path(a.e8_workdir).resolve() if a.e8_workdir else out / 'e8' / 'workdir',
        e8_cache_dir=str(pathlib.Path(a.e8_cache_dir).resolve()) if a.e8_cache_dir else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the chosen steps in order; returns 0 (failures are in the report, not the code)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    report = Report(opts.out, opts.steps, argv)
    report.set(tiny=opts.tiny, peak_tflops_table=PEAK_TFLOPS, peak_note=gpu_report.PEAK_NOTE)
    try:
        report.set(device=device_checks.device_report())
    except Exception as e:  # noqa: BLE001 - a device that does not start is the finding
        report.set(device=error_fields(e))
    for name in opts.steps:
        step = report.step(name)
        step['status'] = 'running'
        report.write()
        t0 = time.time()
        try:
            STEP_FNS[name](report, opts)
            failed = any('error' in r for r in step['rows'])
            step['status'] = 'done, with errors' if failed else 'done'
        except Exception as e:  # noqa: BLE001 - recorded; the next step still runs
            step.update(status='failed', **error_fields(e))
        step['elapsed_s'] = round(time.time() - t0, 1)
        report.write()
        print(f'gpu_check {name}: {step["status"]} in {step["elapsed_s"]} s', flush=True)
    print(f'wrote {opts.out / JSON_NAME} and {opts.out / MD_NAME}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
