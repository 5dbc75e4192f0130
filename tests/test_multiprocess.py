"""Two processes on localhost run one job: the same numbers as one process, one writer.

Each process runs launch.py (through a driver that records, with an audit hook, every
file the process opens for writing), with 1 CPU device each; the one-process run has 2,
so both runs have the same mesh and global batch and must agree to float precision.
The data is scikit-learn's digits written as a folder of PNGs: the one-process run holds
it on its devices, the two-process run streams it (each process decodes its share of each
batch: the same batches), so the two also agree across input modes. A SIGTERM to one
process of a device-resident pair stops both at the same step, saved; re-running both
resumes to the uninterrupted runs' end.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from cnn_jax import parallel
from cnn_jax.data import folder as folder_lib
from cnn_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 900  # Two CPU cores shared with other work: compiling takes most of a run.
TOL = 1e-5
# Time, and where a run resumed from, differ between runs by design.
VOLATILE = {'wall_time_s', 'compile_s', 'train_steps_per_s', 'train_images_per_s'}
VOLATILE |= {'resumed_from_step', 'elapsed_s'}

CONFIG = """
from configs import default


def get_config():  # tests/conftest.py tiny_config, 3 epochs of 8 steps; digits as PNGs.
    c = default.get_config()
    c.dataset = 'digits'  # start() passes folder:<the digits as PNGs>.
    c.input_mode = 'device'  # The streamed run passes 'auto' and a tiny budget.
    c.model = 'small_cnn'
    c.model_options.features = (8,)
    c.model_options.dense = 16
    c.model_options.dropout_rate = 0.2  # A resumed run must replay the dropout masks.
    c.num_epochs = 3
    c.batch_size = 32
    c.eval_batch_size = 64
    c.optimizer = 'adam'
    c.learning_rate = 3e-3
    c.steps_per_epoch = 8
    c.log_every_steps = 2
    return c
"""

# Runs launch.py with argv[2:], appending to the JSON list file argv[1] every path the
# process opened for writing, renamed or removed.
DRIVER = """
import json, os, runpy, sys

log, args = sys.argv[1], sys.argv[2:]
written = []


def hook(event, a):
    if event == 'open' and isinstance(a[0], (str, bytes)) and a[2] & (os.O_WRONLY | os.O_RDWR):
        written.append(os.fsdecode(a[0]))
    elif event in ('os.rename', 'os.replace') and isinstance(a[1], (str, bytes)):
        written.append(os.fsdecode(a[1]))
    elif event in ('os.remove', 'shutil.rmtree') and isinstance(a[0], (str, bytes)):
        written.append(os.fsdecode(a[0]))


sys.addaudithook(hook)
sys.argv = ['launch.py', *args]
try:
    runpy.run_path(os.path.join(os.environ['CNN_JAX_REPO'], 'launch.py'), run_name='__main__')
finally:
    paths = [os.path.abspath(p) for p in written]  # Before this open adds the log itself.
    with open(log, 'w') as f:
        json.dump(paths, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def child_env(root: pathlib.Path, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
        CNN_JAX_CACHE=str(root / 'cache'),  # Shared: later runs reuse compiled programs.
        CNN_JAX_REPO=str(REPO),
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL='3',
    )
    for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
        env.pop(key, None)
    return env


def start(
    root: pathlib.Path, workdir: pathlib.Path, name: str, devices: int, job=None, args=(), data=None
):
    """One process of a run, in its own cwd (root/name); job = (port, count, index); data:
    the folder or archive (default root/digits)."""
    cwd = root / name
    cwd.mkdir(parents=True, exist_ok=True)
    args = [f'--config={root / "tiny.py"}', f'--workdir={workdir}', *args]
    args.append(f'--config.dataset=folder:{data or root / "digits"}')
    if job is not None:
        port, count, index = job
        args += [f'--coordinator=localhost:{port}', f'--num_processes={count}']
        args += [f'--process_id={index}']
    return subprocess.Popen(
        [sys.executable, '-c', DRIVER, str(cwd / 'written.json'), *args],
        cwd=cwd,
        env=child_env(root, devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, output's end) of each process; kills them all if one times out.

    Whole outputs go to output.log in each process's cwd (beside written.json, argv[3]).
    """
    try:
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            (pathlib.Path(p.args[3]).parent / 'output.log').write_text(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # The end of each output says why a process failed (faulthandler's module list cut).
    return [
        (p.returncode, out.split('\nExtension modules:')[0][-3000:])
        for p, out in zip(procs, outs, strict=True)
    ]


def start_pair(root: pathlib.Path, workdir: pathlib.Path, tag: str, args=()) -> list:
    port = free_port()
    return [start(root, workdir, f'{tag}_p{i}', 1, (port, 2, i), args) for i in range(2)]


def write_digits(root: pathlib.Path) -> None:
    """scikit-learn's 1,797 digits as root/{train,test}/<digit>/<i>.png (8 x 8 grey)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / ('train' if i < 1400 else 'test') / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f'{i}.png')


def written(root: pathlib.Path, name: str) -> list[str]:
    return json.loads((root / name / 'written.json').read_text())


def results(workdir: pathlib.Path) -> tuple[dict, list[dict]]:
    """(summary.json, metrics.jsonl rows) without the keys that differ by design."""
    summary = json.loads((workdir / 'summary.json').read_text())
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    drop = lambda d: {k: v for k, v in d.items() if k not in VOLATILE}  # noqa: E731
    return drop(summary), [drop(r) for r in rows]


def max_difference(got, want, where: str = '') -> float:
    """Largest numeric difference; asserts everything else (keys, strings, lists) equal."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        return max([max_difference(got[k], want[k], f'{where}.{k}') for k in want] or [0.0])
    if isinstance(want, list):
        assert len(got) == len(want), where
        pairs = zip(got, want, strict=True)
        return max(
            [max_difference(g, w, f'{where}[{i}]') for i, (g, w) in enumerate(pairs)] or [0.0]
        )
    if isinstance(want, float) and not isinstance(want, bool):
        return abs(got - want)
    assert got == want, where
    return 0.0


def test_a_single_process_job_does_not_start_jax_distributed(monkeypatch):
    for key in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(key, raising=False)
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, '1')
    assert parallel.initialize_distributed('localhost:1') is False


def test_a_slurm_job_of_several_tasks_is_detected(monkeypatch):
    for key in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(key, raising=False)
    slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node1', 'SLURM_PROCID': '0'}
    for key, value in {**slurm, 'SLURM_LOCALID': '0', 'SLURM_NTASKS': '2'}.items():
        monkeypatch.setenv(key, value)
    assert parallel.cluster_process_count() == 2
    monkeypatch.setenv('SLURM_NTASKS', '1')  # One task (sbatch of one process): no join.
    assert parallel.cluster_process_count() == 1
    assert parallel.initialize_distributed() is False


SLURM_2 = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node1', 'SLURM_PROCID': '0'}
SLURM_2 |= {'SLURM_LOCALID': '0', 'SLURM_NTASKS': '2'}
OMPI_3 = {'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:3491', 'OMPI_COMM_WORLD_SIZE': '3'}
OMPI_3 |= {'OMPI_COMM_WORLD_RANK': '0', 'OMPI_COMM_WORLD_LOCAL_RANK': '0'}


def test_cluster_jobs_are_counted_from_their_launchers_environment():
    assert parallel.cluster_process_count({}) == 1
    assert parallel.cluster_process_count(SLURM_2) == 2
    partial = {k: v for k, v in SLURM_2.items() if k != 'SLURM_STEP_NODELIST'}
    assert parallel.cluster_process_count(partial) == 1  # JAX could not join it either.
    assert parallel.cluster_process_count(OMPI_3) == 3
    assert parallel.cluster_process_count({**SLURM_2, **OMPI_3}) == 3  # mpirun inside SLURM.
    gke = {'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}
    assert parallel.cluster_process_count(gke) == 4
    assert parallel.cluster_process_count({**gke, 'MEGASCALE_NUM_SLICES': '2'}) == 8
    assert parallel.cluster_process_count({**OMPI_3, 'OMPI_COMM_WORLD_SIZE': 'x'}) == 1


@pytest.mark.parametrize('launcher', [{}, SLURM_2, OMPI_3, {**SLURM_2, **OMPI_3}])
def test_the_environment_check_agrees_with_jax_own_detection(launcher, monkeypatch):
    """JAX's cluster detection is private (cnn_jax does not import it); a test may."""
    clusters = pytest.importorskip('jax._src.clusters')
    for key in [*SLURM_2, *OMPI_3]:
        monkeypatch.delenv(key, raising=False)
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    envs = (clusters.OmpiCluster, clusters.SlurmCluster)
    jax_env = next((env for env in envs if env.is_env_present()), None)
    want = 1 if jax_env is None else jax_env.get_process_count()
    assert parallel.cluster_process_count() == want


def test_a_half_described_job_is_an_error_not_a_hang(monkeypatch):
    for key in (parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(parallel.ENV_COORDINATOR, 'localhost:1')
    with pytest.raises(ConfigError, match='num_processes=None, process_id=None'):
        parallel.initialize_distributed()
    monkeypatch.setenv(parallel.ENV_PROCESS_ID, 'one')
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='one' is not an integer"):
        parallel.initialize_distributed(num_processes=2)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The uninterrupted runs: one process with 2 devices, two streaming with 1 each."""
    root = tmp_path_factory.mktemp('multiprocess')
    (root / 'tiny.py').write_text(CONFIG)
    write_digits(root / 'digits')
    # The device-resident runs' decoded cache, made here: no TensorFlow import in each.
    folder_lib.read_folder(str(root / 'digits'), cache_dir=str(root / 'cache'))
    ((rc, out),) = finish([start(root, root / 'one', 'one', 2)])
    assert rc == 0, out
    # Past a tiny memory budget, 'auto' streams (as a dataset too large for a device would).
    budget = ['--config.input_mode=auto', '--config.device_memory_budget_gb=1e-6']
    outs = finish(start_pair(root, root / 'two', 'two', budget))
    assert [rc for rc, _ in outs] == [0, 0], outs
    return root


@pytest.mark.slow
def test_two_processes_streaming_give_one_process_numbers(runs):
    one, two = results(runs / 'one'), results(runs / 'two')
    assert 'Input: streamed from the host (' in (runs / 'two_p1' / 'output.log').read_text()
    assert [r['epoch'] for r in two[1]] == [1, 2, 3]
    assert two[0]['num_devices'] == 2 and two[0]['status'] == 'completed'
    assert max_difference(two, one) <= TOL


@pytest.mark.slow
def test_only_process_0_writes_files(runs):
    workdir = str(runs / 'two')

    def files(name):  # /proc/self/comm: threads naming themselves.
        return {p for p in written(runs, name) if not p.startswith(('/proc/', '/dev/'))}

    reports = {os.path.relpath(p, workdir) for p in files('two_p0') if p.startswith(workdir)}
    assert {'config.json', 'metrics.jsonl', 'report.md', 'summary.json'} <= reports
    # Nothing else anywhere: Orbax's checkpoint saves are collective (process 1 writes
    # its array metadata there; replicated arrays come from process 0).
    checkpoints = os.path.join(workdir, 'checkpoints') + os.sep
    assert {p for p in files('two_p1') if not p.startswith(checkpoints)} == set()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_then_rerun_resumes(runs, tmp_path):
    workdir = tmp_path / 'stopped'
    procs = start_pair(runs, workdir, 'stop')
    try:
        lines = []
        for line in procs[1].stdout:  # Process 1 prints its epoch rows too.
            lines.append(line)
            if line.startswith('epoch 1:'):
                procs[1].send_signal(signal.SIGTERM)
                break
        else:
            pytest.fail(''.join(lines))
    finally:
        outs = finish(procs)
    assert [rc for rc, _ in outs] == [130, 130], outs
    saved = sorted(int(p.name) for p in (workdir / 'checkpoints' / 'latest').iterdir())
    assert 8 < saved[-1] < 24, saved  # Stopped in epoch 2 or 3, both at the same step.
    assert not (workdir / 'summary.json').exists()

    outs = finish(start_pair(runs, workdir, 'resume'))
    assert [rc for rc, _ in outs] == [0, 0], outs
    assert json.loads((workdir / 'summary.json').read_text())['resumed_from_step'] == saved[-1]
    assert max_difference(results(workdir), results(runs / 'two')) <= TOL
