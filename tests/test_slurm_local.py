"""keyprep on a real SLURM: a one-node cluster on this machine (Debian's slurm-wlm and munge,
started by ``scripts/start_local_slurm.sh``), the demo dataset submitted with
``keyprep-slurm --submit``, one task killed mid-run with ``scancel`` and resubmitted.

Checked: every task's exit code is recorded; the killed task resumes from its work folder
(the nodes that had finished are not recomputed); the group job of the first submission is
dropped (its dependency can no longer be met) and the resubmission's group job merges both
participants; the derivatives are those of a direct ``keyprep`` run.

Needs root (the daemons run as root) and slurm-wlm/munge, which the script installs with
apt-get when they are missing; skipped with the script's reason where it cannot start them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
START = REPO / 'scripts' / 'start_local_slurm.sh'
BIN = Path(sys.executable).parent
#: The demo at 4 mm with one engine, the target at 4 mm: about a minute a task. What is
#: checked here is SLURM's side (exit codes, kill and resume, the group job), not accuracy.
KEYPREP_ARGS = ['--methods', 'antsRigid', '--sloppy', '--target', 'MNI152NLin2009aSym:res-4',
                '--omp-nthreads', '1']
#: Heads turned by 10 and 20 degrees: within the label network's training poses, so it labels
#: each at the header's pose (the demo's default rotations, up to 180 degrees, cost each
#: labelling a pose search and a second pass: half of a task's time at 2 mm). With seed 3 the
#: two heads' fields of view take 27 and 48 network tiles (seed 42's second head: 80).
ROTATIONS, SEED = (10.0, 20.0), 3
TIMEOUT_S = 1500

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _exe(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip('a local SLURM needs root to start slurmctld and slurmd '
                    '(scripts/start_local_slurm.sh)')
    state = tmp_path_factory.mktemp('slurm_state')
    env = dict(os.environ, KEYPREP_SLURM_PORTS='6917 6918')  # not those of a cluster of yours
    proc = subprocess.run(['bash', str(START), 'start', str(state)], env=env,
                          capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        pytest.skip(lines[-1] if lines else f'start_local_slurm.sh exited {proc.returncode}')
    env['SLURM_CONF'] = str(state / 'slurm.conf')
    yield env
    subprocess.run(['scancel', '--quiet', '--user', 'root'], env=env, capture_output=True, check=False)
    subprocess.run(['bash', str(START), 'stop', str(state)], env=env, capture_output=True, check=False)


def _in_queue(env, job: str) -> bool:
    res = subprocess.run(['squeue', '-h', '-o', '%i %T', '-j', job], env=env,
                         capture_output=True, text=True, check=False)
    return res.returncode == 0 and bool(res.stdout.strip())


def _wait(env, *jobs: str, timeout: float = TIMEOUT_S) -> None:
    t0 = time.time()
    while any(_in_queue(env, j) for j in jobs):
        if time.time() - t0 > timeout:
            raise AssertionError(f'jobs {jobs} still queued after {timeout} s')
        time.sleep(2)


def _submit(env, argv) -> tuple[str, str]:
    res = subprocess.run([_exe('keyprep-slurm'), *argv, '--submit'], env=env,
                         capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r'submitted job (\d+), group job (\d+)', res.stdout)
    assert m, res.stdout
    return m.group(1), m.group(2)


def _tree(root: Path) -> list[str]:
    """Derivative files of the participants (logs and run ids aside)."""
    return sorted(p.relative_to(root).as_posix() for p in root.glob('sub-*/**/*')
                  if p.is_file() and 'log' not in p.relative_to(root).parts)


def _node_finished(node_dir: Path) -> bool:
    """Nipype's own test of a cached node: a hash file that is not ``*_unfinished.json``."""
    return any(not h.name.endswith('_unfinished.json') for h in node_dir.glob('_0x*.json'))


@pytest.fixture(scope='module')
def runs(cluster, tmp_path_factory):
    from keyprep.bids_app.demo import build_demo_dataset

    root = tmp_path_factory.mktemp('slurm_run')
    bids = build_demo_dataset(root / 'bids', seed=SEED, resolution=4.0,
                              rotations=ROTATIONS)
    out = root / 'out'
    argv = [str(bids), str(out), 'participant', '--cpus-per-task', '1', '--mem', '4G',
            '--time', '00:30:00', '--job-name', 'kptest', *KEYPREP_ARGS]
    t0 = time.time()
    array1, group1 = _submit(cluster, argv)

    # kill task 2 (sub-02) once some of its own nodes have finished, mid-run
    work2 = out / 'slurm' / 'work' / 'sub-02'
    while not list(work2.glob('*_wf/sub_02_wf/**/skull_strip/result_skull_strip.pklz')):
        assert time.time() - t0 < TIMEOUT_S, 'task 2 never got going'
        assert _in_queue(cluster, f'{array1}_2'), 'task 2 ended before it could be killed'
        time.sleep(0.5)
    subprocess.run(['scancel', f'{array1}_2'], env=cluster, check=True)
    killed_at = time.time()
    _wait(cluster, f'{array1}_2', timeout=120)
    # compute nodes (datasinks, ds_*, always run: they copy into the output folder) that
    # had finished: Nipype writes a result file for a node that stopped with an error too
    # (the one the kill interrupted); a finished node also has its final hash file
    # (``_0x<hash>.json``, renamed from ``_0x<hash>_unfinished.json`` on success)
    finished = {p: p.stat().st_mtime_ns for p in work2.rglob('result_*.pklz')
                if not p.parent.name.startswith('ds_') and _node_finished(p.parent)}
    unfinished_at_kill = not (out / 'sub-02' / 'anat' /
                              'sub-02_desc-registrationsummary_qc.tsv').exists()

    # resubmit only task 2: it resumes from the same work folder
    array2, group2 = _submit(cluster, [*argv, '--array', '2'])

    # meanwhile, the same participants directly
    direct = root / 'direct'
    res = subprocess.run([_exe('keyprep'), str(bids), str(direct), 'participant', '-w',
                          str(root / 'work_direct'), '--nprocs', '1', *KEYPREP_ARGS],
                         capture_output=True, text=True, check=False, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    _wait(cluster, array1, group1, array2, group2)
    return {'bids': bids, 'out': out, 'direct': direct, 'slurm_dir': out / 'slurm',
            'ids': (array1, group1, array2, group2), 'finished': finished,
            'killed_at': killed_at, 'unfinished_at_kill': unfinished_at_kill,
            'minutes': (time.time() - t0) / 60}


def _exit_codes(slurm_dir: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().rstrip('\n').split('\t')
            for p in (slurm_dir / 'exitcodes').glob('*.tsv')}


def test_every_task_recorded_its_exit_code(runs):
    array1, _, array2, _ = runs['ids']
    codes = _exit_codes(runs['slurm_dir'])
    assert set(codes) == {f'{array1}_1', f'{array1}_2', f'{array2}_2'}, codes
    assert codes[f'{array1}_1'][:4] == ['sub-01', '1', f'{array1}_1', '0']
    assert codes[f'{array1}_2'][0] == 'sub-02' and codes[f'{array1}_2'][3] != '0'  # killed
    assert codes[f'{array2}_2'][:4] == ['sub-02', '2', f'{array2}_2', '0']
    log = runs['slurm_dir'] / 'logs' / f'kptest_{array1}_1.out'
    assert 'keyprep-slurm: exit code 0' in log.read_text()


def test_killed_task_resumed_from_its_work_folder(runs):
    assert runs['unfinished_at_kill'], 'sub-02 had finished before the kill'
    assert runs['finished'], 'no node of sub-02 had finished before the kill'
    for path, mtime in runs['finished'].items():
        assert path.stat().st_mtime_ns == mtime, f'{path} was recomputed'
    later = [p for p in (runs['slurm_dir'] / 'work' / 'sub-02').rglob('result_*.pklz')
             if p not in runs['finished'] and not p.parent.name.startswith('ds_')]
    assert later and all(p.stat().st_mtime > runs['killed_at'] for p in later)


def test_group_job_waits_for_every_task(runs):
    _, group1, _, group2 = runs['ids']
    logs = runs['slurm_dir'] / 'logs'
    assert not (logs / f'kptest-group_{group1}.out').exists()  # afterok never met: dropped
    text = (logs / f'kptest-group_{group2}.out').read_text()
    assert 'exit codes of the participant tasks' in text
    summary = pd.read_csv(runs['out'] / 'group_desc-registrationsummary_qc.tsv', sep='\t')
    assert sorted(summary['participant_id']) == ['sub-01', 'sub-02']
    assert (runs['out'] / 'group.html').is_file()


def test_same_derivatives_as_a_direct_run(runs):
    """The same files, and QC tables with the same rows and columns. (Not the same bytes:
    two direct runs of keyprep differ slightly too, e.g. in Atropos' tissue labels.)"""
    out, direct = runs['out'], runs['direct']
    assert _tree(out) == _tree(direct)
    assert any(p.endswith('_desc-antsRigid_xfm.txt') for p in _tree(out))
    keys = ['participant_id', 'method', 'label_set', 'label_index', 'label_name']
    for sub in ('01', '02'):
        name = f'sub-{sub}/anat/sub-{sub}_desc-registration_qc.tsv'
        a = pd.read_csv(out / name, sep='\t')
        b = pd.read_csv(direct / name, sep='\t')
        assert list(a.columns) == list(b.columns)
        assert a[keys].astype(str).values.tolist() == b[keys].astype(str).values.tolist()
    print(f'SLURM run with kill and resume: {runs["minutes"]:.1f} min')
