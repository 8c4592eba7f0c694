"""Reliability (issue 17): nothing is written into the input dataset under any spelling of
the output or work folder, implausible images and memory budgets are refused before any node
runs, one run per work folder, and an interrupted run stops cleanly and resumes.

Each test here failed before the fix it checks; docs/reliability.md lists them with the exit
code and the message of every case."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.bids_app.run import run
from keyprep.pipeline import errors as E

from .conftest import write_bids


def _tiny_head(shape=(24, 28, 24), zoom=8.0) -> nb.Nifti1Image:
    """A small synthetic 'head' (a blurred ellipsoid with noise), ``zoom`` mm voxels."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    data = (np.sqrt((grid ** 2).sum(0)) < 0.8) * 100.0 + rng.random(shape) * 5
    aff = np.diag([zoom, zoom, zoom, 1.0])
    aff[:3, 3] = -np.asarray(shape) * zoom / 2
    return nb.Nifti1Image(data.astype('f4'), aff)


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry below ``root``: files by content, folders and symlinks by kind/target."""
    out = {}
    for p in sorted(root.rglob('*')):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = 'link:' + os.readlink(p)
        elif p.is_dir():
            out[rel] = 'dir'
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _stderr_lines(capsys) -> list[str]:
    """stderr's lines, less the input validation's summary of a valid dataset."""
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return [ln for ln in err.splitlines()
            if ln.strip() and not ln.startswith('keyprep: BIDS validation: 0 errors')]


# ---------------------------------------------------------------------------------------------
# 1. Nothing is written into the input dataset, however the folders are spelled


@pytest.fixture
def dataset(tmp_path):
    return write_bids(tmp_path / 'ds', {'01': _tiny_head()})


def _layouts(tmp_path: Path, ds: Path) -> dict[str, tuple[str, str]]:
    """Spelling -> (output folder, work folder) for every layout that writes into ``ds``."""
    (tmp_path / 'link_to_ds').symlink_to(ds, target_is_directory=True)
    (tmp_path / 'link_to_anat').symlink_to(ds / 'sub-01' / 'anat', target_is_directory=True)
    outside = str(tmp_path / 'out')
    work = str(tmp_path / 'work')
    return {
        'output ds/../ds': (f'{ds}/../{ds.name}', work),
        'output ds/sub-01/..': (f'{ds}/sub-01/..', work),
        'output symlink to the dataset': (str(tmp_path / 'link_to_ds'), work),
        'output symlink to a folder inside it': (str(tmp_path / 'link_to_anat'), work),
        'output below a symlink to the dataset': (str(tmp_path / 'link_to_ds' / 'out'), work),
        'work ds/../ds/work': (outside, f'{ds}/../{ds.name}/work'),
        'work inside derivatives/': (outside, str(ds / 'derivatives' / 'work')),
        'work symlink to the dataset': (outside, str(tmp_path / 'link_to_ds')),
        'output derivatives/ through ..': (
            f'{ds}/derivatives/keyprep/../../sub-01', work),
    }


@pytest.mark.parametrize('spelling', [
    'output ds/../ds', 'output ds/sub-01/..', 'output symlink to the dataset',
    'output symlink to a folder inside it', 'output below a symlink to the dataset',
    'work ds/../ds/work', 'work inside derivatives/', 'work symlink to the dataset',
    'output derivatives/ through ..',
])
def test_no_spelling_writes_into_the_input_dataset(tmp_path, capsys, dataset, spelling):
    out, work = _layouts(tmp_path, dataset)[spelling]
    before = tree_digest(dataset)
    code = run([str(dataset), out, 'participant', '-w', work, '--boilerplate-only'])
    lines = _stderr_lines(capsys)
    assert code == E.EXIT_USAGE, lines
    assert len(lines) == 1 and 'input dataset' in lines[0], lines
    assert tree_digest(dataset) == before  # byte for byte, no new file or folder


def test_derivatives_subfolder_is_the_one_allowed_output_inside(tmp_path, capsys, dataset):
    """``<bids>/derivatives/<name>`` is the BIDS place for derivatives: accepted for the
    output (not for the work folder), and only that folder is written."""
    before = tree_digest(dataset)
    out = dataset / 'derivatives' / 'keyprep'
    code = run([str(dataset), f'{dataset}/../{dataset.name}/derivatives/keyprep',
                'participant', '-w', str(tmp_path / 'work'), '--boilerplate-only'])
    assert code == E.EXIT_OK, capsys.readouterr().err
    after = tree_digest(dataset)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and all(k == 'derivatives' or k.startswith('derivatives/') for k in changed)
    assert (out / 'dataset_description.json').is_file()


# ---------------------------------------------------------------------------------------------
# 2. Implausible images are refused at validation; memory follows the images and --mem


def _python_env() -> dict:
    env = dict(os.environ)
    env.setdefault('NIPYPE_NO_ET', '1')
    env['PYTHONPATH'] = str(Path(__file__).resolve().parents[1]) + (
        os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    return env


def _keyprep(args, *, mem_limit_gb=None, **kw):
    """``python -m keyprep ARGS`` in a child process (optionally under an address-space
    limit, so that a runaway allocation fails instead of swapping the machine)."""
    import resource
    import subprocess
    import sys

    def limit():
        if mem_limit_gb:
            n = int(mem_limit_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    return subprocess.run([sys.executable, '-m', 'keyprep', *map(str, args)],
                          env=_python_env(), preexec_fn=limit, capture_output=True,
                          text=True, **kw)


@pytest.mark.parametrize('zoom, needle', [(50.0, 'voxel size 50 x 50 x 50 mm'),
                                          (0.01, 'voxel size 0.01 x 0.01 x 0.01 mm')])
def test_absurd_voxel_sizes_exit_65_under_a_memory_limit(tmp_path, zoom, needle):
    """46 x 55 x 46 voxels of 50 mm (a 2.3 m field of view: the label network's grid used to
    grow to 20 GB and the kernel killed the run) or of 0.01 mm (a node crashed with a
    traceback): one line naming the file and the value, exit 65, under a 6 GB limit."""
    bids = write_bids(tmp_path / 'ds', {'01': _tiny_head((46, 55, 46), zoom)})
    before = tree_digest(bids)
    # the BIDS validator (Deno) cannot start under an address-space limit
    # (tests/test_bids_validation.py); the image checks are what is tested here
    res = _keyprep([bids, tmp_path / 'out', 'participant', '-w', tmp_path / 'work',
                    '--nprocs', '1', '--skip-bids-validation'], mem_limit_gb=6, timeout=300)
    assert res.returncode == E.EXIT_DATA, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if needle in ln]
    assert len(lines) == 1 and 'sub-01_T1w.nii.gz' in lines[0], res.stderr
    assert tree_digest(bids) == before
    assert not list((tmp_path / 'work').glob('keyprep_*_wf'))  # no node ran


@pytest.mark.parametrize('shape, zoom, needle', [
    ((4, 60, 60), 2.0, 'field of view 8 x 120 x 120 mm'),
    ((300, 300, 300), 2.0, 'field of view 600 x 600 x 600 mm'),
])
def test_implausible_field_of_view_is_one_line(tmp_path, capsys, shape, zoom, needle):
    img = nb.Nifti1Image(np.ones(shape, 'u1') * np.arange(shape[2], dtype='u1'),
                         np.diag([zoom, zoom, zoom, 1.0]))
    bids = write_bids(tmp_path / 'ds', {'01': _tiny_head(), '02': img})
    code = run([str(bids), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--boilerplate-only'])
    assert code == E.EXIT_DATA
    lines = [ln for ln in _stderr_lines(capsys) if needle in ln]
    assert len(lines) == 1 and 'sub-02_T1w.nii.gz' in lines[0]


def test_too_many_voxels_refused_from_the_header(tmp_path):
    """The voxel count is checked before the data are read: a header announcing 2 x 10^9
    voxels (with no data behind it) is one line, not an allocation."""
    from keyprep.pipeline.io import load_image

    hdr = nb.Nifti1Header()
    hdr.set_data_shape((1300, 1300, 1300))
    hdr.set_data_dtype('f4')
    hdr.set_zooms((0.2, 0.2, 0.2))
    f = tmp_path / 'huge.nii'
    with open(f, 'wb') as fh:
        fh.write(hdr.binaryblock + b'\0' * 4)
    with pytest.raises(E.ImageError, match='2,197,000,000 voxels') as err:
        load_image(f)
    assert err.value.exit_code == E.EXIT_DATA


def _build_wf(tmp_path, images: dict[str, nb.Nifti1Image], methods=('antsRigid',)):
    from keyprep.bids_app.bids import AnatImage, ProcessingGroup
    from keyprep.pipeline.targets import parse_target
    from keyprep.workflows.base import init_keyprep_wf

    groups = []
    for sub, img in images.items():
        path = tmp_path / f'sub-{sub}' / 'anat' / f'sub-{sub}_T1w.nii.gz'
        path.parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(path)
        groups.append(ProcessingGroup(sub, None, [AnatImage(path, 'T1w', sub, None)]))
    spec = parse_target('MNI152NLin2009aSym:res-4')
    wf = init_keyprep_wf(groups=groups, target=spec, target_file=spec.path, skip_source=None,
                         methods=list(methods), bids_dir=tmp_path, output_dir=tmp_path / 'out',
                         work_dir=tmp_path / 'work', run_uuid='test', sloppy=True)
    return wf, groups, spec


def test_memory_estimates_follow_the_images(tmp_path):
    from keyprep.pipeline.memory import Geometry, apply_memory_estimates, label_network_gb

    small = _tiny_head()  # 192 mm at 8 mm
    wide = _tiny_head((160, 160, 160), 3.0)  # 480 mm at 3 mm: the network grid is large
    wf, groups, spec = _build_wf(tmp_path, {'01': small, '02': wide})
    before = {n: wf.get_node(n)._mem_gb for n in wf.list_node_names()}
    target = Geometry.of(spec.path).resampled(4.0)
    est = {e.name: e for e in apply_memory_estimates(wf, groups, target)}
    net01 = est['sub_01_wf.anat_T1w_wf.synthseg'].mem_gb
    net02 = est['sub_02_wf.anat_T1w_wf.synthseg'].mem_gb
    assert net01 == before['sub_01_wf.anat_T1w_wf.synthseg']  # small image: the figure
    assert net02 == pytest.approx(label_network_gb(Geometry.of(wide)), abs=0.01) and net02 > 8
    assert est['sub_02_wf.anat_T1w_wf.synthseg'].image == 'sub-02_T1w.nii.gz'
    # no estimate below what the builders gave, and the nodes carry them for MultiProc
    for name, e in est.items():
        assert e.mem_gb >= before[name] - 1e-9
        assert wf.get_node(name)._mem_gb == e.mem_gb
    # 4 million voxels at 3 mm: less than a 1 mm head, so the other nodes keep their figures
    assert est['sub_02_wf.anat_T1w_wf.bias_correct'].mem_gb == \
        before['sub_02_wf.anat_T1w_wf.bias_correct']


def test_memory_budget_refuses_or_lowers_parallelism():
    from keyprep.pipeline.memory import NodeEstimate, check_budget

    est = [NodeEstimate('sub_02_wf.anat_T1w_wf.synthseg', 9.2, 'sub-02_T1w.nii.gz'),
           NodeEstimate('sub_01_wf.anat_T1w_wf.conform', 1.0, 'sub-01_T1w.nii.gz')]
    with pytest.raises(E.UsageError) as err:
        check_budget(est, 4.0)
    assert err.value.exit_code == E.EXIT_USAGE
    assert 'the label network on sub-02_T1w.nii.gz' in str(err.value)
    assert '--mem 10G' in str(err.value)
    note = check_budget(est, 20.0, nprocs=8, omp_nthreads=2)
    assert note and 'at most 2 of them run at once instead of 4' in note
    assert check_budget(est, 40.0, nprocs=8, omp_nthreads=2) is None
    assert check_budget(est, None) is None  # 9.2 GB fits this machine's memory


def test_mem_below_one_node_is_refused_before_any_node_runs(tmp_path, capsys):
    bids = write_bids(tmp_path / 'ds', {'01': _tiny_head((160, 160, 160), 3.0)})
    code = run([str(bids), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--mem', '4G', '--methods', 'antsRigid'])
    lines = _stderr_lines(capsys)
    assert code == E.EXIT_USAGE, lines
    assert len(lines) == 1 and lines[0].startswith('keyprep: --mem 4 GB is less than'), lines
    assert 'sub-01_T1w.nii.gz' in lines[0]
    assert not list((tmp_path / 'work').glob('keyprep_*_wf'))  # no node ran


# ---------------------------------------------------------------------------------------------
# 3. One run per work folder; the output's shared files


def _hold_lock(folder: Path):
    """Another process holding the work folder's lock until it is killed."""
    import subprocess
    import sys

    code = ('import sys, time; from pathlib import Path; '
            'from keyprep.bids_app.guard import WorkFolderLock; '
            'WorkFolderLock(Path(sys.argv[1])).acquire(); print("locked", flush=True); '
            'time.sleep(600)')
    proc = subprocess.Popen([sys.executable, '-c', code, str(folder)], env=_python_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'locked'
    return proc


def test_second_run_on_a_busy_work_folder_exits_75_at_once(tmp_path, capsys, dataset):
    import time

    work = tmp_path / 'work'
    work.mkdir()
    holder = _hold_lock(work)
    try:
        t0 = time.monotonic()
        code = run([str(dataset), str(tmp_path / 'out'), 'participant', '-w', str(work),
                    '--boilerplate-only'])
        took = time.monotonic() - t0
        lines = _stderr_lines(capsys)
        assert code == E.EXIT_LOCKED == 75, lines
        assert len(lines) == 1 and 'in use by another keyprep run' in lines[0]
        assert f'pid {holder.pid}' in lines[0] and str(work) in lines[0]
        assert took < 30
        assert not (work / 'bids_db').exists()  # refused before indexing
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock with the process: the next run goes on
    assert run([str(dataset), str(tmp_path / 'out'), 'participant', '-w', str(work),
                '--boilerplate-only']) == E.EXIT_OK


def test_lock_is_released_after_a_run(tmp_path, dataset):
    from keyprep.bids_app.guard import WorkFolderLock

    args = [str(dataset), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
            '--boilerplate-only']
    assert run(args) == E.EXIT_OK
    WorkFolderLock(tmp_path / 'work').acquire().release()  # free again
    assert run(args) == E.EXIT_OK


def test_output_lock_serialises_shared_writes(tmp_path):
    import threading
    import time

    from keyprep.bids_app.guard import output_lock

    spans = []

    def writer():
        with output_lock(tmp_path):
            t0 = time.monotonic()
            time.sleep(0.3)
            spans.append((t0, time.monotonic()))

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # one after the other
    assert not list(tmp_path.iterdir())  # no lock file left in the output


def test_parallel_participant_runs_share_one_output_folder(tmp_path):
    """Two runs with their own work folders into one output folder, started together: both
    succeed, and the shared files are whole (as before; now also under a lock)."""
    import json
    import subprocess
    import sys

    bids = write_bids(tmp_path / 'ds', {'01': _tiny_head(), '02': _tiny_head()})
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'keyprep', str(bids), str(tmp_path / 'out'), 'participant',
         '--participant-label', sub, '-w', str(tmp_path / f'work{sub}'), '--boilerplate-only'],
        env=_python_env(), stderr=subprocess.PIPE, text=True) for sub in ('01', '02')]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    out = tmp_path / 'out'
    assert json.loads((out / 'dataset_description.json').read_text())['DatasetType'] == \
        'derivative'
    assert [p.name for p in out.rglob('.*')] == ['.bidsignore']  # no temporary files
    assert (out / 'sub-01' / 'log').is_dir() and (out / 'sub-02' / 'log').is_dir()


# ---------------------------------------------------------------------------------------------
# Cases that already behaved (issue 17's sweep), checked here where no other test did


@pytest.mark.parametrize('kind', ['truncated', 'not an image'])
def test_corrupt_target_stops_the_run(tmp_path, capsys, dataset, kind):
    target = tmp_path / 'target.nii.gz'
    _tiny_head().to_filename(target)
    data = target.read_bytes()
    target.write_bytes(data[:len(data) // 2] if kind == 'truncated' else b'not an image' * 50)
    code = run([str(dataset), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--target', str(target), '--boilerplate-only'])
    lines = _stderr_lines(capsys)
    assert code == E.EXIT_DATA, lines
    assert len(lines) == 1 and lines[0].startswith('keyprep: --target: target.nii.gz: ')


# ---------------------------------------------------------------------------------------------
# 8. Smaller items


@pytest.mark.parametrize('kind', ['read-only folder', 'a file', 'uncreatable'])
def test_unusable_output_path_exits_73(tmp_path, capsys, dataset, kind):
    out = tmp_path / 'out'
    if kind == 'a file':
        out.write_text('not a folder')
    elif kind == 'uncreatable':
        out = Path('/proc/keyprep-test-out')  # no folder can be made there, even by root
    else:
        out.mkdir()
        out.chmod(0o555)
        if os.access(out, os.W_OK) and os.geteuid() == 0:  # root writes anyway: use a probe
            probe = out / 'probe'
            try:
                probe.touch()
                probe.unlink()
                out.chmod(0o755)
                pytest.skip('running as root on a file system that ignores permissions')
            except OSError:
                pass
    try:
        code = run([str(dataset), str(out), 'participant', '-w', str(tmp_path / 'work'),
                    '--boilerplate-only'])
        lines = _stderr_lines(capsys)
        assert code == E.EXIT_CANTCREAT == 73, lines
        assert len(lines) == 1 and 'output_dir' in lines[0] and 'internal error' not in lines[0]
    finally:
        if out.is_dir():
            out.chmod(0o755)


def test_skipped_participants_with_invalid_labels_are_named(tmp_path, capsys, dataset):
    for bad in ('sub-01_x', 'sub-a-b'):
        (dataset / bad / 'anat').mkdir(parents=True)
        _tiny_head().to_filename(dataset / bad / 'anat' / f'{bad}_T1w.nii.gz')
    code = run([str(dataset), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--skip-bids-validation', '--boilerplate-only'])
    assert code == E.EXIT_OK
    lines = [ln for ln in _stderr_lines(capsys) if 'not valid participant labels' in ln]
    assert len(lines) == 1 and 'sub-01_x' in lines[0] and 'sub-a-b' in lines[0]


def test_qform_sform_conflict_is_named(tmp_path, capsys):
    img = _tiny_head()
    qform = img.affine.copy()
    qform[:3, 3] += [0.0, 12.0, 0.0]
    img.set_qform(qform, code=1)
    img.set_sform(img.affine, code=1)
    bids = write_bids(tmp_path / 'ds', {'01': img})
    code = run([str(bids), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--boilerplate-only'])
    assert code == E.EXIT_OK
    lines = [ln for ln in _stderr_lines(capsys) if 'disagree' in ln]
    assert len(lines) == 1, lines
    assert 'sub-01_T1w.nii.gz' in lines[0] and '12.0 mm' in lines[0]
    assert 'the sform is used' in lines[0]


# ---------------------------------------------------------------------------------------------
# 4. SIGINT / SIGTERM


def _alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat', 'rb') as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b')') + 2:][:1] not in (b'Z', b'X')


def test_signal_during_a_long_c_call_still_ends_the_run(tmp_path):
    """The main thread inside C code that never returns to Python (ITK, torch) cannot raise:
    the signal watcher ends the worker processes and the process after the grace period."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / 'stuck.py'
    script.write_text(
        'import hashlib, subprocess\n'
        'from keyprep.bids_app.guard import Interruptions\n'
        "worker = subprocess.Popen(['sleep', '120'])\n"
        'with Interruptions(grace_s=1.0, keep_armed=True):\n'
        "    print('ready', worker.pid, flush=True)\n"
        "    hashlib.pbkdf2_hmac('sha256', b'x', b'y', 200_000_000)  # minutes in C\n"
        "print('returned', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], env=_python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = proc.stdout.readline().split()
    assert ready[0] == 'ready'
    worker = int(ready[1])
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 143, err
    assert took < 10 and 'returned' not in out
    assert 'did not stop within 1 s' in err
    time.sleep(0.2)
    assert not _alive(worker)  # the 'worker' was ended with the run


def _outputs_are_whole(out: Path) -> None:
    """No temporary file, and every file of the output reads in full."""
    import json

    import pandas as pd

    assert [p.name for p in out.rglob('.*')] == ['.bidsignore']
    for p in out.rglob('*'):
        if p.name.endswith('.nii.gz'):
            np.asarray(nb.load(p).dataobj)
        elif p.suffix == '.json':
            json.loads(p.read_text())
        elif p.suffix == '.tsv':
            pd.read_csv(p, sep='\t')


@pytest.mark.slow
@pytest.mark.parametrize('signame, nprocs', [('SIGINT', 1), ('SIGTERM', 2)])
def test_interrupted_run_stops_cleanly_and_resumes(tmp_path, signame, nprocs):
    """Ctrl-C with --nprocs 1 used to be taken as a node failure: the run went on through
    every node, wrote a crash file and a ``fail`` QC row, and exited 1. Now the run stops
    within seconds with 130 (SIGINT) or 143 (SIGTERM), its worker processes end, no crash
    file or QC row is written, what was written is whole, and a rerun finishes (exit 0)."""
    import signal
    import subprocess
    import sys
    import time

    from keyprep.bids_app.guard import descendants

    from .conftest import CH2, coarse

    bids = write_bids(tmp_path / 'ds', {'01': coarse(CH2, 6.0)})
    raw = tree_digest(bids)
    out, work = tmp_path / 'out', tmp_path / 'work'
    args = [sys.executable, '-m', 'keyprep', str(bids), str(out), 'participant', '-w', str(work),
            '--nprocs', str(nprocs), '--omp-nthreads', '1', '--methods', 'antsRigid',
            '--sloppy', '--target', 'MNI152NLin2009aSym:res-4']
    proc = subprocess.Popen(args, env=_python_env(), stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    # wait until the workflow runs: the first node has finished, the next ones are running
    while not list(work.glob('keyprep_*_wf/**/result_*.pklz')):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() - t0 < 300, 'the workflow never started'
        time.sleep(0.1)
    time.sleep(2.0)
    assert proc.poll() is None, 'the run ended before it could be interrupted'
    workers = descendants(proc.pid)
    t1 = time.monotonic()
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - t1
    code = 128 + getattr(signal, signame)
    assert proc.returncode == code, err[-3000:]
    assert took < 20, took
    assert 'Traceback' not in err
    assert err.strip().splitlines()[-1].startswith(f'keyprep: {signame}: stopped')
    time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)]
    assert not list(out.rglob('crash-*'))
    assert not list(out.rglob('*_qc.tsv'))  # no QC row, so no false fail
    _outputs_are_whole(out)
    assert tree_digest(bids) == raw
    # the rerun resumes from the work folder and finishes
    res = subprocess.run(args, env=_python_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = next(out.rglob('*desc-registrationsummary_qc.tsv')).read_text()
    assert '\tfail\t' not in summary and 'antsRigid' in summary
    _outputs_are_whole(out)


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    """``kill -9`` of the main process (the OOM killer, a lost node): its workers end with
    it (they no longer keep computing, or hold the work folder's lock), and a rerun with
    the same work folder reuses every finished node and finishes."""
    import signal
    import subprocess
    import sys
    import time

    from keyprep.bids_app.guard import descendants

    from .conftest import CH2, coarse

    bids = write_bids(tmp_path / 'ds', {'01': coarse(CH2, 6.0)})
    out, work = tmp_path / 'out', tmp_path / 'work'
    args = [sys.executable, '-m', 'keyprep', str(bids), str(out), 'participant', '-w', str(work),
            '--nprocs', '2', '--omp-nthreads', '1', '--methods', 'antsRigid', '--sloppy',
            '--target', 'MNI152NLin2009aSym:res-4']
    proc = subprocess.Popen(args, env=_python_env(), stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while len(list(work.glob('keyprep_*_wf/**/result_*.pklz'))) < 3:
        assert proc.poll() is None and time.monotonic() - t0 < 300
        time.sleep(0.1)
    time.sleep(1.0)
    workers = descendants(proc.pid)
    assert workers  # MultiProc's worker processes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while [p for p in workers if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]  # they died with the run
    finished = {p: p.stat().st_mtime_ns for p in work.rglob('result_*.pklz')
                if not p.parent.name.startswith('ds_')}
    assert finished
    res = subprocess.run(args, env=_python_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # reused, not recomputed
    _outputs_are_whole(out)


# ---------------------------------------------------------------------------------------------
# Read-only and full file systems (a private mount namespace: root, unshare(1))


def _can_mount() -> bool:
    import shutil
    import subprocess

    if not shutil.which('unshare') or not hasattr(os, 'geteuid') or os.geteuid() != 0:
        return False
    res = subprocess.run(['unshare', '-m', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt'],
                         capture_output=True)
    return res.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason='needs root and unshare -m '
                                                          '(a private mount namespace)')

_CHECK_WHOLE = '''
import json, sys
from pathlib import Path
import nibabel as nb, numpy as np, pandas as pd
out = Path(sys.argv[1])
extra = [p.name for p in out.rglob('.*') if p.name != '.bidsignore']
assert not extra, extra
n = 0
for p in out.rglob('*'):
    if p.name.endswith('.nii.gz'):
        np.asarray(nb.load(p).dataobj); n += 1
    elif p.suffix == '.json':
        json.loads(p.read_text()); n += 1
    elif p.suffix == '.tsv':
        pd.read_csv(p, sep='\\t'); n += 1
print(n)
'''


def _in_namespace(tmp_path: Path, script: str, timeout: int = 900):
    import subprocess

    sh = tmp_path / 'ns.sh'
    sh.write_text('set -u\n' + script)
    return subprocess.run(['unshare', '-m', 'sh', str(sh)], env=_python_env(),
                          capture_output=True, text=True, timeout=timeout)


@needs_mount
def test_read_only_output_file_system_exits_73(tmp_path, dataset):
    import sys

    out = tmp_path / 'out'
    out.mkdir()
    res = _in_namespace(tmp_path, f'''
mount -t tmpfs -o size=1m,ro tmpfs {out}
{sys.executable} -m keyprep {dataset} {out} participant -w {tmp_path / 'work'} --boilerplate-only
''', timeout=300)
    assert res.returncode == E.EXIT_CANTCREAT, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'Read-only file system' in lines[0] and 'output_dir' in lines[0]


@needs_mount
@pytest.mark.slow
def test_full_disk_and_read_only_input(tmp_path):
    """The input dataset mounted read-only and the output on a 500 kB file system that fills
    up mid-run: exit 74 with one line, every file written is whole (no temporary file);
    with room again, the rerun finishes (exit 0) from the input still read-only."""
    import sys

    from .conftest import CH2, coarse

    bids = write_bids(tmp_path / 'ds', {'01': coarse(CH2, 6.0)})
    raw = tree_digest(bids)
    out, work = tmp_path / 'out', tmp_path / 'work'
    out.mkdir()
    check = tmp_path / 'check.py'
    check.write_text(_CHECK_WHOLE)
    py = sys.executable
    run_ = (f'{py} -m keyprep {bids} {out} participant -w {work} --nprocs 1 --methods antsRigid '
            '--sloppy --target MNI152NLin2009aSym:res-4')
    res = _in_namespace(tmp_path, f'''
mount --bind {bids} {bids} && mount -o remount,bind,ro {bids}
mount -t tmpfs -o size=500k tmpfs {out}
{run_} 2> {tmp_path / 'err1.txt'}; echo "rc1 $?"
{py} {check} {out} && echo "whole1"
mount -o remount,size=64m {out}
{run_} 2> {tmp_path / 'err2.txt'}; echo "rc2 $?"
{py} {check} {out} && echo "whole2"
touch {bids}/probe 2>/dev/null || echo "input read-only"
''')
    stdout = res.stdout.split()
    err1 = (tmp_path / 'err1.txt').read_text()
    assert 'rc1' in stdout and stdout[stdout.index('rc1') + 1] == str(E.EXIT_IOERR), err1[-3000:]
    last = err1.strip().splitlines()[-1]
    assert 'No space left on device' in last and 'internal error' not in err1
    assert 'whole1' in stdout, res.stderr[-3000:]
    assert stdout[stdout.index('rc2') + 1] == '0', (tmp_path / 'err2.txt').read_text()[-3000:]
    assert 'whole2' in stdout and 'input read-only' in res.stdout
    assert tree_digest(bids) == raw


# ---------------------------------------------------------------------------------------------
# Documentation and wiring


def test_readme_exit_code_table_matches_the_code():
    import re

    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    section = readme[readme.index('### Exit codes'):]
    section = section[:section.index('\n## ')]
    codes = {int(m) for m in re.findall(r'^\| (\d+) \|', section, flags=re.M)}
    assert codes == set(E.EXIT_CODES)
    assert '<bids_dir>/derivatives/<name>/' in section


def test_help_lists_every_exit_code(capsys):
    assert run(['--help']) == 0
    text = capsys.readouterr().out
    for code in (73, 74, 75, 130, 143):
        assert f'  {code} ' in text


def test_mem_and_interruptions_reach_nipype(tmp_path, monkeypatch):
    import argparse

    from nipype.pipeline import engine as pe

    from keyprep.bids_app import run as run_mod
    from keyprep.bids_app.guard import Interruptions

    for var in ('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        monkeypatch.setenv(var, os.environ.get(var, '1'))
    wf = pe.Workflow(name='w', base_dir=str(tmp_path))
    calls = []
    monkeypatch.setattr(wf, 'run', lambda **kw: calls.append(kw))
    stop = Interruptions()
    opts = argparse.Namespace(stop_on_first_crash=False, write_graph=False, verbose_count=0,
                              omp_nthreads=1, nprocs=2, mem=6.0, device='cpu', use_plugin=None,
                              interruptions=stop)
    assert run_mod._run_workflow(wf, opts, tmp_path / 'crash', 'cpu')
    args = calls[0]['plugin_args']
    assert calls[0]['plugin'] == 'MultiProc' and args['memory_gb'] == 6.0
    # the progress lines' callback, which calls the guard's first
    assert args['status_callback'].__self__.then == stop.status_callback
    opts.nprocs = 1
    run_mod._run_workflow(wf, opts, tmp_path / 'crash', 'cpu')
    assert calls[1]['plugin'] == 'Linear' and list(calls[1]['plugin_args']) == ['status_callback']
    linear_callback = calls[1]['plugin_args']['status_callback']
    assert linear_callback.__self__.then == stop.status_callback
    stop.status_callback(None, 'start')  # no signal: nothing happens
    stop.signum = 15
    with pytest.raises(KeyboardInterrupt):
        stop.status_callback(None, 'start')
    with pytest.raises(KeyboardInterrupt):  # also through the progress callback
        linear_callback(None, 'start')
