"""Progress lines of a workflow run (keyprep.bids_app.progress), from real Nipype runs of
small workflows through run.py's ``_run_workflow``: participants' start and finish, a
final count, cached nodes counted, ``-v`` one line per node that ran, failures and the
nodes they kept from running, the heartbeat during a long node, and no flood."""

from __future__ import annotations

import argparse
import os

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from keyprep.bids_app import run as run_mod
from keyprep.bids_app.progress import Progress


def _add(x, delay=0.0):
    import time

    time.sleep(delay)
    return x + 1


def _fail(x):
    raise ValueError('this node fails on purpose')


def _node(name, delay=0.0, function=_add):
    inputs = ['x', 'delay'] if function is _add else ['x']
    node = pe.Node(niu.Function(function=function, input_names=inputs, output_names=['out']),
                   name=name)
    if function is _add:
        node.inputs.delay = delay
    return node


def _workflow(base_dir, fail=False, slow=0.0):
    """A keyprep-like graph: the target's node, then two participants' chains of 3 nodes
    (with an identity node, which Nipype removes and the count must skip)."""
    wf = pe.Workflow(name='keyprep_test_wf', base_dir=str(base_dir))
    target_wf = pe.Workflow(name='target_wf')
    prep = _node('prep')
    prep.inputs.x = 0
    target_wf.add_nodes([prep])
    for group in ('sub_01', 'sub_02_ses_a'):
        gwf = pe.Workflow(name=f'{group}_wf')
        inputnode = pe.Node(niu.IdentityInterface(fields=['x']), name='inputnode')
        first = _node('first', delay=slow if group == 'sub_01' else 0.0)
        second = _node('second', function=_fail if fail and group == 'sub_01' else _add)
        third = _node('third')
        gwf.connect([(inputnode, first, [('x', 'x')]), (first, second, [('out', 'x')]),
                     (second, third, [('out', 'x')])])
        wf.connect(target_wf, 'prep.out', gwf, 'inputnode.x')
    return wf


def _opts(nprocs, verbose=0):
    return argparse.Namespace(stop_on_first_crash=False, write_graph=False,
                              verbose_count=verbose, omp_nthreads=1, nprocs=nprocs, mem=None,
                              device='cpu', use_plugin=None, interruptions=None)


@pytest.fixture
def env(monkeypatch):
    for var in ('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        monkeypatch.setenv(var, os.environ.get(var, '1'))


def _keyprep_lines(capsys):
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return [ln for ln in err.splitlines() if ln.startswith('keyprep: ')]


@pytest.mark.parametrize('nprocs', [2, 1])  # MultiProc, Linear
def test_participants_and_counts_then_cached_rerun(tmp_path, capsys, env, nprocs):
    run_mod._setup_logging(0)
    assert run_mod._run_workflow(_workflow(tmp_path), _opts(nprocs), tmp_path / 'crash')
    lines = _keyprep_lines(capsys)
    text = '\n'.join(lines)
    # 7 nodes: the target's and 3 per participant (identity nodes are not run)
    assert 'keyprep: workflow: 7 nodes (2 participants and the target)' in text
    for unit, n in (('target', 1), ('sub-01', 3), ('sub-02 ses-a', 3)):
        assert f'keyprep: {unit}: started ({n} nodes)' in text
        assert sum(ln.startswith(f'keyprep: {unit}: finished in ') and f'({n} nodes, 0 failed)'
                   in ln for ln in lines) == 1
    assert lines[-1].startswith('keyprep: workflow finished: 7/7 nodes done (0 cached), '
                                '0 failed, 0 running')
    assert not [ln for ln in lines if 'node done' in ln]  # -v only
    assert len(lines) == 1 + 2 * 3 + 1  # no flood: no per-node line at default verbosity
    # the rerun reuses every node: counted as done and cached
    run_mod._setup_logging(0)
    assert run_mod._run_workflow(_workflow(tmp_path), _opts(nprocs), tmp_path / 'crash')
    lines = _keyprep_lines(capsys)
    assert lines[-1].startswith('keyprep: workflow finished: 7/7 nodes done (7 cached)')


def test_verbose_lists_each_node_that_ran(tmp_path, capsys, env):
    run_mod._setup_logging(1)
    assert run_mod._run_workflow(_workflow(tmp_path, slow=0.5), _opts(2, verbose=1),
                                 tmp_path / 'crash')
    done = [ln for ln in _keyprep_lines(capsys) if ln.startswith('keyprep: node done: ')]
    names = sorted(ln.split()[3] for ln in done)
    assert names == ['sub_01_wf.first', 'sub_01_wf.second', 'sub_01_wf.third',
                     'sub_02_ses_a_wf.first', 'sub_02_ses_a_wf.second',
                     'sub_02_ses_a_wf.third', 'target_wf.prep']
    slow = next(ln for ln in done if 'sub_01_wf.first' in ln)
    assert float(slow.rsplit('(', 1)[1].split()[0]) >= 0.5  # its time, in seconds
    # a rerun at -v: every node cached, none listed
    run_mod._setup_logging(1)
    assert run_mod._run_workflow(_workflow(tmp_path, slow=0.5), _opts(2, verbose=1),
                                 tmp_path / 'crash')
    assert not [ln for ln in _keyprep_lines(capsys) if 'node done' in ln]


@pytest.mark.parametrize('nprocs', [2, 1])
def test_failure_is_counted_with_what_it_kept_from_running(tmp_path, capsys, env, nprocs):
    run_mod._setup_logging(0)
    assert not run_mod._run_workflow(_workflow(tmp_path, fail=True), _opts(nprocs),
                                     tmp_path / 'crash')
    lines = _keyprep_lines(capsys)
    text = '\n'.join(lines)
    assert 'keyprep: sub-01: node failed: sub_01_wf.second' in text
    assert 'keyprep: sub-01: stopped after' in text
    assert '1 of 3 nodes done, 1 failed, 1 not run (they need a failed node)' in text
    assert sum('sub-02 ses-a: finished in' in ln for ln in lines) == 1  # the other goes on
    assert 'keyprep: workflow finished: 5/7 nodes done (0 cached), 1 failed' in text


def test_heartbeat_names_the_long_node_and_interval_throttles(tmp_path, capsys, env):
    """During a long node, a progress line after ``heartbeat`` s without any line."""
    run_mod._setup_logging(0)
    wf = _workflow(tmp_path, slow=3.0)
    with Progress(wf, interval=60.0, heartbeat=1.0, plugin='Linear') as progress:
        wf.run(plugin='Linear', plugin_args={'status_callback': progress.status_callback})
    lines = _keyprep_lines(capsys)
    beats = [ln for ln in lines if ln.startswith('keyprep: progress: ')]
    assert 1 <= len(beats) <= 4, lines
    assert '1 running (longest: sub_01_wf.first, ' in beats[0]
    # interval 0: a progress line each time a node ends (7), and the heartbeat stays quiet
    wf = _workflow(tmp_path / 'again')
    with Progress(wf, interval=0.0, heartbeat=0.0, plugin='Linear') as progress:
        wf.run(plugin='Linear', plugin_args={'status_callback': progress.status_callback})
    assert sum(ln.startswith('keyprep: progress: ') for ln in _keyprep_lines(capsys)) == 7
