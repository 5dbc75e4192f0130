"""How long a reproduction would train here: a few measured steps, scaled to its schedule."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from cnn_jax import run_record
from cnn_jax.records import read_json
from reproduce.reported import Experiment, schedule
from reproduce.workdirs import ROOT, config_stem, launch_command

PROBE_STEPS = 10  # The first is excluded (compilation): 9 timed steps.


def probe_key(exp: Experiment, config: str) -> str:
    return f'{exp.id}:{config}:{run_record.host_description()}'


def measured_throughput(root: pathlib.Path) -> dict[str, dict]:
    return read_json(root / 'throughput.json') or {}


def probe(exp: Experiment, config: str, root: pathlib.Path, data: dict[str, str]) -> dict:
    """Measured training throughput of `config` on this device, from a few steps.

    Cached in root/throughput.json per (experiment config, host); the probe's own
    workdir is thrown away.
    """
    cache_file = root / 'throughput.json'
    cache = measured_throughput(root)
    key = probe_key(exp, config)
    if key in cache:
        return cache[key]
    probe_dir = root / '_probe' / exp.id / config_stem(config)
    run_record.start_over(probe_dir)
    measured_config, variant = exp.probe_as.get(config, (config, schedule(config)['variants'][0]))
    only = [f'--config.only={variant}'] if variant else []
    cmd = [
        *launch_command(exp, measured_config, probe_dir, data),
        *only,
        '--config.num_epochs=1',
        f'--config.steps_per_epoch={PROBE_STEPS}',
        '--config.max_eval_examples=512',
        '--config.early_stopping.patience=0',
    ]
    print(f'{exp.id}: measuring {config} ({PROBE_STEPS} steps) ...', flush=True)
    proc = subprocess.run(
        [sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    summaries = sorted(probe_dir.rglob('summary.json'))
    run_summaries = [json.loads(p.read_text()) for p in summaries]
    run_summaries = [s for s in run_summaries if 'train_steps_per_s' in s]
    if proc.returncode != 0 or not run_summaries:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
        return {'error': tail[0][:300]}
    s = run_summaries[0]
    result = {
        'train_images_per_s': s['train_images_per_s'],
        'num_train_examples': s['num_train_examples'],
        'device': f'{s["platform"]} ({s["device_kind"]}) x{s["num_devices"]}',
    }
    cache[key] = result
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache, indent=2) + '\n')
    run_record.start_over(probe_dir)
    return result


def estimate_seconds(config: str, measured: dict) -> float | None:
    """Training time at full schedule (every variant and seed; evaluation not counted).

    The SVM task trains no network: one forward pass over the training images, taken as
    a third of a training step's cost.
    """
    if not measured.get('train_images_per_s'):
        return None
    plan = schedule(config)
    if plan['task'] == 'svm':
        return measured['num_train_examples'] / (3 * measured['train_images_per_s'])
    images = measured['num_train_examples'] * plan['epochs'] * plan['runs']
    return images / measured['train_images_per_s']
