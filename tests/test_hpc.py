"""Clusters without a cluster: GPU scheduling of the torch nodes, Nipype plugin files, and
the SLURM scripts that keyprep-slurm writes (their content and their bash syntax)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, TraitedSpec, traits
from nipype.pipeline import engine as pe

from keyprep.bids_app import run as run_mod
from keyprep.bids_app import slurm
from keyprep.pipeline.errors import EXIT_NO_MATCH, EXIT_USAGE, KeyprepError

from .conftest import CH2, coarse, write_bids
from .test_workflows import _build, _groups

# ---------------------------------------------------------------------------------------------
# GPU scheduling


def _nodes(wf):
    return {name: wf.get_node(name) for name in wf.list_node_names()}


def _opts(**kw):
    base = {'stop_on_first_crash': False, 'write_graph': False, 'verbose_count': 0,
            'omp_nthreads': 2, 'nprocs': 4, 'mem': None, 'device': 'auto', 'use_plugin': None}
    base.update(kw)
    return argparse.Namespace(**base)


def _capture_run(monkeypatch, wf):
    """wf.run records its arguments; the thread variables _run_workflow sets are restored."""
    for var in ('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        monkeypatch.setenv(var, os.environ.get(var, '1'))
    calls = []
    monkeypatch.setattr(wf, 'run', lambda **kw: calls.append(kw))
    return calls


def test_cuda_declares_gpu_nodes_and_slots(tmp_path, monkeypatch):
    import torch

    wf = _build(tmp_path, _groups(tmp_path), ['antsRigid'], device='cuda', omp_nthreads=2)
    gpu = {n: node for n, node in _nodes(wf).items() if node.is_gpu_node()}
    # torch nodes: at least the skull strip of the target and of both subjects
    strips = [n for n in _nodes(wf) if n.endswith('.skull_strip')]
    assert len(strips) == 3 and set(strips) <= set(gpu)
    cpu_procs = {n: node.n_procs for n, node in _nodes(wf).items() if n not in gpu}

    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    calls = _capture_run(monkeypatch, wf)
    assert run_mod._run_workflow(wf, _opts(), tmp_path / 'crash', 'cuda')
    assert calls[0]['plugin'] == 'MultiProc'
    assert calls[0]['plugin_args']['n_gpu_procs'] == 2
    assert calls[0]['plugin_args']['n_procs'] == 4
    assert all(node.n_procs == 1 for node in gpu.values())
    devices = [node.inputs.device for node in gpu.values()]  # spread over both GPUs
    assert set(devices) == {'cuda:0', 'cuda:1'}
    assert abs(devices.count('cuda:0') - devices.count('cuda:1')) <= 1
    # the CPU nodes are as they were
    assert {n: node.n_procs for n, node in _nodes(wf).items() if n not in gpu} == cpu_procs


def test_one_indexed_device_is_one_gpu(tmp_path):
    wf = _build(tmp_path, _groups(tmp_path), ['antsRigid'], device='cuda:1')
    assert run_mod.gpu_plugin_args(wf, 'cuda:1', n_gpus=4) == {'n_gpu_procs': 1}
    gpu = [node for node in _nodes(wf).values() if node.is_gpu_node()]
    assert gpu and all(node.inputs.device == 'cuda:1' for node in gpu)


def test_cpu_path_is_unchanged(tmp_path, monkeypatch):
    wf = _build(tmp_path, _groups(tmp_path), ['antsRigid', 'antsSyN'], device='cpu',
                omp_nthreads=2)
    before = {n: (node.n_procs, node.mem_gb) for n, node in _nodes(wf).items()}
    assert not any(node.is_gpu_node() for node in _nodes(wf).values())
    calls = _capture_run(monkeypatch, wf)
    assert run_mod._run_workflow(wf, _opts(device='auto'), tmp_path / 'crash', 'cpu')
    # The progress reporter's status_callback is the only addition to the CPU plugin
    # arguments; nothing GPU-related reaches them.
    assert len(calls) == 1 and calls[0]['plugin'] == 'MultiProc'
    args = dict(calls[0]['plugin_args'])
    assert callable(args.pop('status_callback'))
    assert args == {'n_procs': 4, 'raise_insufficient': False, 'maxtasksperchild': 1}
    assert {n: (node.n_procs, node.mem_gb) for n, node in _nodes(wf).items()} == before
    assert run_mod.gpu_plugin_args(wf, 'cpu', n_gpus=8) == {}


class _SleepInputSpec(BaseInterfaceInputSpec):
    seconds = traits.Float(1.0, usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, nohash=True)
    tag = traits.Int(0)


class _SleepOutputSpec(TraitedSpec):
    span = traits.Tuple(traits.Float, traits.Float)


class _Sleep(SimpleInterface):
    """A stand-in torch node: records when it ran."""

    input_spec = _SleepInputSpec
    output_spec = _SleepOutputSpec

    def _run_interface(self, runtime):
        t0 = time.time()
        time.sleep(self.inputs.seconds)
        self._results['span'] = (t0, time.time())
        return runtime


@pytest.mark.parametrize('device, most_at_once', [('cuda', 1), ('cpu', 3)])
def test_multiproc_runs_at_most_n_gpu_nodes_at_once(tmp_path, device, most_at_once):
    wf = pe.Workflow(name='gpu_wf', base_dir=str(tmp_path))
    for i in range(3):
        wf.add_nodes([pe.Node(_Sleep(tag=i, use_gpu=device == 'cuda'), name=f'torch_{i}',
                              n_procs=1)])
    args = {'n_procs': 3, 'raise_insufficient': False,
            **run_mod.gpu_plugin_args(wf, device, n_gpus=1)}
    result = wf.run(plugin='MultiProc', plugin_args=args)
    spans = [node.result.outputs.span for node in result.nodes()]
    at_once = max(sum(1 for a, b in spans if a <= start < b) for start, _ in spans)
    if most_at_once == 1:
        assert at_once == 1  # one GPU: the torch nodes ran one after the other
    else:
        assert at_once >= 2  # on the CPU they run side by side, as before


# ---------------------------------------------------------------------------------------------
# Nipype plugin files (--use-plugin)


def test_use_plugin_file_selects_the_plugin(tmp_path, monkeypatch):
    wf = _build(tmp_path, _groups(tmp_path), ['antsRigid'])
    plugin = tmp_path / 'plugin.yml'
    plugin.write_text('plugin: SLURM\nplugin_args:\n  sbatch_args: -p short -t 1:00:00\n')
    calls = _capture_run(monkeypatch, wf)
    assert run_mod._run_workflow(wf, _opts(use_plugin=plugin), tmp_path / 'crash', 'cpu')
    # the file's arguments, and the progress lines' node status callback (batch plugins
    # report node status as MultiProc does)
    callback = calls[0]['plugin_args'].pop('status_callback')
    assert calls == [{'plugin': 'SLURM', 'plugin_args': {'sbatch_args': '-p short -t 1:00:00'}}]
    assert type(callback.__self__).__name__ == 'Progress'
    # a MultiProc file refines keyprep's own settings
    plugin.write_text(json.dumps({'plugin': 'MultiProc', 'plugin_args': {'n_procs': 1}}))
    calls.clear()
    run_mod._run_workflow(wf, _opts(use_plugin=plugin), tmp_path / 'crash', 'cpu')
    assert calls[0]['plugin_args']['n_procs'] == 1
    assert calls[0]['plugin_args']['maxtasksperchild'] == 1


def test_bad_plugin_file_is_a_usage_error(tmp_path):
    ds = write_bids(tmp_path / 'ds', {'01': coarse(CH2, 8.0)})
    bad = tmp_path / 'plugin.yml'
    bad.write_text('- just\n- a list\n')
    code = run_mod.run([str(ds), str(tmp_path / 'out'), 'participant', '-w',
                        str(tmp_path / 'work'), '--use-plugin', str(bad)])
    assert code == EXIT_USAGE
    assert not (tmp_path / 'out').exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# keyprep-slurm: the scripts


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('slurm_ds')
    img = coarse(CH2, 8.0)
    ds = write_bids(root / 'ds', {'01': img, '02': img, '03': img, '04': None})
    # sub-03's T1w has an acq- entity (for --bids-filter-file); sub-04 has no anatomy
    t1 = ds / 'sub-03' / 'anat' / 'sub-03_T1w.nii.gz'
    t1.rename(t1.with_name('sub-03_acq-fast_T1w.nii.gz'))
    (ds / 'sub-03' / 'anat' / 'sub-03_T1w.json').rename(
        ds / 'sub-03' / 'anat' / 'sub-03_acq-fast_T1w.json')
    return ds


def _bash_ok(script: Path):
    subprocess.run(['bash', '-n', str(script)], check=True)


def test_scripts_one_participant_per_task(dataset, tmp_path):
    out = tmp_path / 'out'
    jobs = slurm.write_slurm_scripts([
        str(dataset), str(out), 'participant', '--partition', 'short', '--time', '0:30:00',
        '--mem', '6G', '--cpus-per-task', '3', '--max-parallel', '2',
        '--work-root', '/scratch/$USER/kp', '--sbatch-arg=--account=lab',
        '--methods', 'antsRigid', '--sloppy'])
    assert jobs.participants == ['01', '02', '03']  # sub-04 has no anatomical image
    assert '04' in jobs.skipped
    assert (out / 'slurm' / 'participants.txt').read_text() == '01\n02\n03\n'
    text = jobs.participant_script.read_text()
    for line in ('#SBATCH --array=1-3%2', '#SBATCH --cpus-per-task=3', '#SBATCH --mem=6G',
                 '#SBATCH --time=0:30:00', '#SBATCH --partition=short',
                 '#SBATCH --account=lab', f'#SBATCH --output={out}/slurm/logs/%x_%A_%a.out',
                 'WORK_ROOT="/scratch/$USER/kp"', 'WORK="$WORK_ROOT/sub-$LABEL"'):
        assert line in text
    assert '#SBATCH --gpus' not in text and 'apptainer' not in text
    cmd = next(ln for ln in text.splitlines() if ' participant ' in ln and ln.endswith('&'))
    assert '--participant-label "$LABEL" -w "$WORK"' in cmd
    assert '--methods antsRigid --sloppy --nprocs 3 --mem 6G' in cmd
    assert 'exitcodes/${SLURM_ARRAY_JOB_ID}_${TASK}.tsv' in text
    group = jobs.group_script.read_text()
    assert group.rstrip().endswith(f'{dataset} {out} group')
    for script in (jobs.participant_script, jobs.group_script, out / 'slurm' / 'submit.sh'):
        _bash_ok(script)
    assert 'afterok:$JOB' in (out / 'slurm' / 'submit.sh').read_text()


def test_filters_are_keyprep_s_own(dataset, tmp_path):
    jobs = slurm.write_slurm_scripts([str(dataset), str(tmp_path / 'o1'),
                                      '--participant-label', 'sub-02', '03', '--sloppy'])
    assert jobs.participants == ['02', '03']
    assert '--participant-label "$LABEL"' in jobs.participant_script.read_text()
    assert "'03'" not in jobs.participant_script.read_text()
    filt = tmp_path / 'filter.json'
    filt.write_text(json.dumps({'t1w': {'acquisition': 'fast'}}))
    jobs = slurm.write_slurm_scripts([str(dataset), str(tmp_path / 'o2'),
                                      '--bids-filter-file', str(filt)])
    assert jobs.participants == ['03']
    with pytest.raises(KeyprepError) as exc:
        slurm.write_slurm_scripts([str(dataset), str(tmp_path / 'o3'),
                                   '--participant-label', '99'])
    assert exc.value.exit_code == EXIT_NO_MATCH


def test_container_and_gpus(dataset, tmp_path):
    sif = tmp_path / 'keyprep.sif'
    sif.write_bytes(b'')
    out = tmp_path / 'out'
    jobs = slurm.write_slurm_scripts([str(dataset), str(out), '--gpus', '1', '--container',
                                      str(sif), '--bind', '/opt/tpl:/tpl:ro',
                                      '--work-root', '$TMPDIR/kp'])
    text = jobs.participant_script.read_text()
    assert '#SBATCH --gpus=1' in text
    assert (f'apptainer run --cleanenv --nv -B {dataset}:{dataset}:ro -B {out} -B "$WORK" '
            f'-B /opt/tpl:/tpl:ro {sif}') in text
    assert '--device cuda' in text
    group = jobs.group_script.read_text()
    assert '--nv' not in group and f'-B {dataset}:{dataset}:ro' in group
    _bash_ok(jobs.participant_script)


def test_usage_errors(dataset, tmp_path):
    for extra in (['-w', str(tmp_path / 'w')], ['--bids-database-dir', str(tmp_path)],
                  ['--participant', '01'], ['--work', str(tmp_path / 'w')],
                  ['--container', str(tmp_path / 'missing.sif')],
                  ['--nipype-plugin', 'SLURM', '--container', __file__]):
        with pytest.raises(KeyprepError) as exc:
            slurm.write_slurm_scripts([str(dataset), str(tmp_path / 'o'), *extra])
        assert exc.value.exit_code == EXIT_USAGE, extra
    assert slurm.main([str(dataset), str(tmp_path / 'o'), '--methods', 'nope']) == EXIT_USAGE


def test_nipype_plugin_driver(dataset, tmp_path):
    import yaml

    jobs = slurm.write_slurm_scripts([str(dataset), str(tmp_path / 'out'), '--nipype-plugin',
                                      'SLURM', '--partition', 'p', '--cpus-per-task', '2'])
    assert jobs.participant_script is None and jobs.main_script == jobs.driver_script
    plugin = yaml.safe_load((jobs.slurm_dir / 'nipype_plugin.yml').read_text())
    assert plugin == {'plugin': 'SLURM', 'plugin_args': {
        'sbatch_args': '--cpus-per-task=2 --mem=8G --time=02:00:00 --partition=p'}}
    text = jobs.driver_script.read_text()
    assert '--participant-label 01 02 03' in text and '--use-plugin' in text
    assert 'export LOGNAME=' in text
    _bash_ok(jobs.driver_script)


def test_submit_calls_sbatch_with_afterok(dataset, tmp_path):
    fake = tmp_path / 'sbatch'
    log = tmp_path / 'calls.txt'
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\necho $(( $(wc -l < {log}) + 41 ))\n')
    fake.chmod(0o755)
    jobs = slurm.write_slurm_scripts([str(dataset), str(tmp_path / 'out')])
    ids = slurm.submit(jobs, array='2', sbatch=str(fake))
    assert ids == {'participant': '42', 'group': '43'}
    calls = log.read_text().splitlines()
    assert calls[0] == f'--parsable --array=2 {jobs.participant_script}'
    assert calls[1] == (f'--parsable --dependency=afterok:42 --kill-on-invalid-dep=yes '
                        f'{jobs.group_script}')
    assert (jobs.slurm_dir / 'jobs.tsv').read_text().split('\t')[1:3] == ['42', '43']
