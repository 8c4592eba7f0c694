"""End to end on real data at reduced resolution: participant level with skull stripping,
two engines, a bad participant, the group level, a resumed rerun, and the reports rendered
in headless Chromium."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nb
import pandas as pd
import pytest

from keyprep.bids_app.run import run
from keyprep.pipeline import errors as E

from .conftest import CH2, coarse, rotated_copy, write_bids

pytestmark = pytest.mark.slow

EXPECTED_ANAT = [
    'sub-01_desc-brain_mask.nii.gz',
    'sub-01_desc-preproc_T1w.nii.gz',
    'sub-01_desc-registration_qc.tsv',
    'sub-01_desc-registrationsummary_qc.tsv',
    'sub-01_from-MNI152NLin2009aSym_to-T1w_mode-image_desc-antsRigid_xfm.txt',
    'sub-01_from-MNI152NLin2009aSym_to-T1w_mode-image_desc-antsSyN_xfm.nii.gz',
    'sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_desc-antsRigid_xfm.txt',
    'sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_desc-antsSyN_xfm.nii.gz',
    'sub-01_seg-synthseg_dseg.nii.gz',
    'sub-01_seg-tissue_dseg.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_desc-antsRigid_T1w.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_desc-antsRigid_jacobian.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_desc-antsSyN_T1w.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_desc-antsSyN_jacobian.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_seg-synthseg_desc-antsRigid_dseg.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_seg-synthseg_desc-antsSyN_dseg.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_seg-tissue_desc-antsRigid_dseg.nii.gz',
    'sub-01_space-MNI152NLin2009aSym_seg-tissue_desc-antsSyN_dseg.nii.gz',
]


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp('e2e')
    head = rotated_copy(coarse(CH2, 4.0), 20.0, axis=0, shift=(5.0, 0.0, -4.0))  # oblique head
    truncated = root / 'bad.nii.gz'
    head.to_filename(truncated)
    bids = write_bids(root / 'ds', {'01': head, '02': truncated.read_bytes()[:3000]})
    raw = _digest(bids)
    out, work = root / 'out', root / 'work'
    args = [str(bids), str(out), 'participant', '-w', str(work), '--nprocs', '2',
            '--omp-nthreads', '1', '--methods', 'antsRigid', 'antsSyN', '--sloppy',
            '--target', 'MNI152NLin2009aSym:res-4', '--random-seed', '7']
    code = run(args)
    return {'root': root, 'bids': bids, 'out': out, 'work': work, 'args': args, 'code': code,
            'raw': raw}


def test_exit_code_reports_the_bad_participant(e2e):
    assert e2e['code'] == E.EXIT_DATA  # sub-02 is truncated; sub-01 ran
    assert _digest(e2e['bids']) == e2e['raw']  # nothing written into the input dataset


def test_derivatives(e2e):
    out = e2e['out']
    anat = sorted(p.name for p in (out / 'sub-01' / 'anat').iterdir()
                  if not p.name.endswith('.json'))
    assert anat == sorted(EXPECTED_ANAT)
    assert not (out / 'sub-02' / 'anat').exists()
    assert not [p for p in out.rglob('.*') if p.name != '.bidsignore']  # no temporary files
    desc = json.loads((out / 'dataset_description.json').read_text())
    assert desc['DatasetType'] == 'derivative'
    assert (out / 'seg-tissue_dseg.tsv').read_text().startswith('index\tname')
    side = json.loads((out / 'sub-01/anat/sub-01_desc-preproc_T1w.json').read_text())
    assert side['SkullStripped'] is False and side['Oblique'] is True
    assert side['Sources'] == ['bids:raw:sub-01/anat/sub-01_T1w.nii.gz']
    mask = json.loads((out / 'sub-01/anat/sub-01_desc-brain_mask.json').read_text())
    assert mask['InputSkullStripped'] is False and 'deepbet' in mask['SkullStripMethod']
    xfm = json.loads((out / 'sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_'
                            'desc-antsSyN_xfm.json').read_text())
    assert xfm['seed'] == 7 and xfm['parameters']['type_of_transform'] == 'SyN'
    assert nb.load(out / 'sub-01/anat/sub-01_desc-brain_mask.nii.gz').get_data_dtype() == 'uint8'


def _weights_sha256():
    from keyprep.workflows.anatomical import synthseg_weights

    return hashlib.sha256(synthseg_weights().read_bytes()).hexdigest()


def test_label_network_derivatives(e2e):
    """seg-synthseg dseg files for the image and the target, with the root look-up table."""
    import numpy as np

    from keyprep.pipeline.synth.labels import OUTPUT_LABELS, lut_tsv

    out = e2e['out']
    lut = (out / 'seg-synthseg_dseg.tsv').read_text()
    assert lut == lut_tsv() and lut.startswith('index\tname\tabbreviation\tcolor\n')
    assert len(lut.splitlines()) == 1 + 32
    sha = _weights_sha256()
    anat = out / 'sub-01' / 'anat'
    pre = nb.load(anat / 'sub-01_desc-preproc_T1w.nii.gz')
    tpl = out / 'tpl-MNI152NLin2009aSym'
    for dseg, grid in ((anat / 'sub-01_seg-synthseg_dseg.nii.gz', pre),
                       (tpl / 'tpl-MNI152NLin2009aSym_res-4_seg-synthseg_dseg.nii.gz',
                        nb.load(tpl / 'tpl-MNI152NLin2009aSym_res-4_desc-brain_T1w.nii.gz'))):
        img = nb.load(dseg)
        assert img.get_data_dtype() == 'int16'
        assert img.shape == grid.shape and np.allclose(img.affine, grid.affine, atol=1e-4)
        values = set(np.unique(np.asanyarray(img.dataobj)).tolist())
        assert values <= set(OUTPUT_LABELS) and len(values) > 1
        side = json.loads(dseg.with_name(dseg.name.replace('.nii.gz', '.json')).read_text())
        assert side['NetworkWeightsSha256'] == sha
        assert isinstance(side['NetworkTrainingStep'], int) and side['Sources']
        assert isinstance(side['SoftwareVersions'], str)  # BIDS: a string
        assert 'torch ' in side['SoftwareVersions'] and side['RandomSeed'] == 7
        assert side['SoftwareVersionsByPackage']['torch']
    side = json.loads((anat / 'sub-01_seg-synthseg_dseg.json').read_text())
    assert side['Sources'] == ['bids:raw:sub-01/anat/sub-01_T1w.nii.gz']
    assert (out / 'sub-01/figures/sub-01_desc-synthseg_dseg.png').is_file()
    assert (tpl / 'figures/tpl-MNI152NLin2009aSym_res-4_desc-synthseg_dseg.png').is_file()


def test_qc_tables(e2e):
    out = e2e['out']
    long = pd.read_csv(out / 'sub-01/anat/sub-01_desc-registration_qc.tsv', sep='\t')
    assert list(long.columns[:8]) == ['participant_id', 'session_id', 'source', 'method',
                                      'label_set', 'label_index', 'label_name', 'dice']
    assert len(long) == 2 * (32 + 3)
    from keyprep.pipeline.synth.labels import OUTPUT_NAMES

    for method in ('antsRigid', 'antsSyN'):  # per-structure rows for each engine
        rows = long[(long['method'] == method) & (long['label_set'] == 'synthseg')]
        assert list(rows['label_index']) == [k for k in OUTPUT_NAMES if k]
        assert list(rows['label_name']) == [v for k, v in OUTPUT_NAMES.items() if k]
        assert rows['dice'].dropna().between(0, 1).all() and rows['dice'].notna().sum() >= 2
        tissue = long[(long['method'] == method) & (long['label_set'] == 'tissue')]
        assert list(tissue['label_name']) == ['GM', 'WM', 'CSF']
        assert tissue['dice'].between(0, 1).all()
    summ = pd.read_csv(out / 'sub-01/anat/sub-01_desc-registrationsummary_qc.tsv', sep='\t')
    assert set(summ['method']) == {'antsRigid', 'antsSyN'}
    assert set(summ['status']) <= {'pass', 'warn', 'fail'}
    from keyprep.pipeline.synth.labeller import card_trusted, read_model_card

    # the packaged weights' model card decides (read without torch: no torch threads may
    # start in this process before Nipype forks its workers)
    trusted = card_trusted(read_model_card())
    basis = 'synthseg' if trusted else 'tissue'
    assert (summ['label_set'] == basis).all() and (summ['n_labels'] >= 2).all()
    assert summ['dice_mean'].between(0, 1).all()
    assert (summ['synthseg_weights_sha256'] == _weights_sha256()).all()
    rigid = summ.set_index('method').loc['antsRigid']
    assert rigid['jac_min'] == pytest.approx(1.0, abs=1e-4)  # a rigid transform keeps volume
    syn = summ.set_index('method').loc['antsSyN']
    assert syn['tissue_dice_mean'] > 0.4 and syn['jac_neg_frac'] == 0
    # SyN returns its own inverse; the round trip of the exported pair is measured
    assert syn['inverse'] == 'engine' and 0 <= syn['inverse_error_mean_mm'] < 0.5
    assert syn['inverse_error_p99_mm'] >= syn['inverse_error_mean_mm']
    assert pd.isna(rigid['inverse']) and pd.isna(rigid['inverse_error_mean_mm'])
    assert (summ['chain'] == summ['method']).all()  # no starting affine
    assert (summ['seed'] == 7).all() and summ['versions'].str.contains('antspyx').all()
    # the status follows the mean structure Dice of a validated network, else the tissue
    # Dice with a note saying why
    from keyprep.pipeline import qc

    for _, row in summ.iterrows():
        if row['dice_mean'] < qc.dice_thresholds(row['label_set'])[0]:
            assert row['status'] == 'fail'
            assert ('structure Dice' if trusted else 'tissue Dice') in row['status_reason']
        if not trusted:
            assert 'not validated' in row['status_reason']
    meta = json.loads((out / 'sub-01/anat/sub-01_desc-registrationsummary_qc.json').read_text())
    assert 'status' in meta and 'Description' in meta['dice_mean']


def test_transform_derivative_reproduces_the_warped_image(e2e):
    from keyprep.pipeline.transforms import apply_transforms

    out, anat = e2e['out'], e2e['out'] / 'sub-01' / 'anat'
    brain = e2e['root'] / 'brain.nii.gz'
    pre = nb.load(anat / 'sub-01_desc-preproc_T1w.nii.gz')
    mask = nb.load(anat / 'sub-01_desc-brain_mask.nii.gz').get_fdata() > 0
    nb.Nifti1Image(pre.get_fdata() * mask, pre.affine).to_filename(brain)
    ref = out / 'tpl-MNI152NLin2009aSym' / 'tpl-MNI152NLin2009aSym_res-4_desc-brain_T1w.nii.gz'
    mine = apply_transforms(brain, ref, [anat / 'sub-01_from-T1w_to-MNI152NLin2009aSym_mode-'
                                         'image_desc-antsSyN_xfm.nii.gz'],
                            e2e['root'] / 'mine.nii.gz')
    theirs = nb.load(anat / 'sub-01_space-MNI152NLin2009aSym_desc-antsSyN_T1w.nii.gz')
    diff = abs(nb.load(mine).get_fdata() - theirs.get_fdata()).max()
    assert diff <= 1e-3 * theirs.get_fdata().max()


def test_reports_and_errors(e2e):
    out = e2e['out']
    page = (out / 'sub-01.html').read_text()
    for section in ('summary', 'anatomical', 'registration', 'qc', 'about', 'boilerplate',
                    'errors'):
        assert f'id="{section}"' in page
    # mask, tissue and structure labels, the target's labels, 2 x before/after, antsSyN's
    # J (antsRigid's J is one number, stated in words), and the per-structure Dice plot
    assert page.count('data:image/png;base64') == 8
    assert 'J = 1.0000 everywhere' in page
    assert 'Dice per structure' in page and 'Left-Hippocampus' in page
    assert 'Figure not produced' not in page
    assert 'No errors to report' in page
    bad = (out / 'sub-02.html').read_text()
    assert 'truncated' in bad and 'Input error' in bad


def test_group_level(e2e):
    out = e2e['out']
    assert run([str(e2e['bids']), str(out), 'group']) == E.EXIT_OK
    group = pd.read_csv(out / 'group_desc-registrationsummary_qc.tsv', sep='\t')
    assert len(group) == 2
    long = pd.read_csv(out / 'group_desc-registration_qc.tsv', sep='\t')
    assert len(long) == 2 * (32 + 3)
    assert set(long['label_set']) == {'synthseg', 'tissue'}
    html = (out / 'group.html').read_text()
    assert html.count('data:image/png;base64') >= 2
    assert 'id="structures"' in html and 'Right-Hippocampus' in html


def test_rerun_resumes_from_the_work_dir(e2e):
    results = sorted(e2e['work'].rglob('register/result_register.pklz'))
    assert len(results) == 2
    # the label network ran once for the image and once for the target, and is not rerun
    results += sorted(e2e['work'].rglob('synthseg/result_synthseg.pklz'))
    assert len(results) == 4
    stamps = [p.stat().st_mtime_ns for p in results]
    args = [a for a in e2e['args']] + ['--participant-label', '01']
    assert run(args) == E.EXIT_OK
    assert [p.stat().st_mtime_ns for p in results] == stamps  # nothing recomputed


def _chromium():
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.browser
def test_report_renders_in_headless_chromium(e2e, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip('Chromium is not installed (scripts/install.sh installs it)')
    flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
             '--disable-background-networking', '--disable-component-update', '--disable-sync',
             f'--user-data-dir={tmp_path / "profile"}']
    url = (e2e['out'] / 'sub-01.html').as_uri()
    # A copy of the report with a probe that counts the images the browser decoded.
    probe = tmp_path / 'probe.html'
    script = ('<script>window.addEventListener("load",function(){var imgs=[...document.images];'
              'document.title="ok:"+imgs.filter(i=>i.complete&&i.naturalWidth>0).length+"/"+'
              'imgs.length+":"+document.querySelectorAll("section").length;});</script>')
    probe.write_text((e2e['out'] / 'sub-01.html').read_text().replace('</body>',
                                                                       script + '</body>'))
    dom = subprocess.run([exe, *flags, '--virtual-time-budget=5000', '--dump-dom',
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert '<title>ok:8/8:7</title>' in dom, dom[:300]
    shot = tmp_path / 'report.png'
    subprocess.run([exe, *flags, '--window-size=1400,3000', f'--screenshot={shot}', url],
                   capture_output=True, timeout=120)
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert('L'), dtype=float)
    assert pixels.std() > 20  # a rendered page with figures, not a blank one


def test_failed_node_gives_crash_file_exit_code_and_report(e2e, tmp_path):
    """An engine that raises, next to antsRigid, in a run of sub-01 that resumes from a copy
    of the module's work folder (same image, target and seed: the anatomical nodes, the
    target's and antsRigid's come from Nipype's cache, so only the new engine's nodes and
    what follows them run, instead of a second whole participant run)."""
    from keyprep.pipeline.engines import base as engine_base
    from keyprep.pipeline.engines.base import Engine, register_engine

    class Broken(Engine):
        name = 'testBroken'
        family = 'test'
        transform_kind = 'linear'
        description = 'always fails'

        def run(self, fixed, moving, out_dir, options, fixed_mask=None, moving_mask=None):
            raise RuntimeError('this engine always fails')

    register_engine(Broken)
    try:
        work, out = tmp_path / 'work', tmp_path / 'out'
        shutil.copytree(e2e['work'], work, symlinks=True)
        args = list(e2e['args'])
        args[args.index(str(e2e['out']))] = str(out)
        args[args.index(str(e2e['work']))] = str(work)
        methods = args.index('--methods')
        args[methods + 1:methods + 3] = ['antsRigid', 'testBroken']
        code = run(args + ['--participant-label', '01'])
    finally:
        engine_base._REGISTRY.pop('testBroken', None)
    assert code == E.EXIT_FAILED_NODES
    crashes = list(out.glob('sub-01/log/*/crash-*.txt'))
    assert len(crashes) == 1 and 'this engine always fails' in crashes[0].read_text()
    # the other engine still delivered its outputs
    assert (out / 'sub-01/anat/sub-01_space-MNI152NLin2009aSym_desc-antsRigid_T1w.nii.gz').exists()
    page = (out / 'sub-01.html').read_text()
    assert 'Node failed' in page and 'this engine always fails' in page
    # the QC table lists both engines: the working one measured, the broken one failed
    summ = pd.read_csv(out / 'sub-01/anat/sub-01_desc-registrationsummary_qc.tsv', sep='\t')
    rows = summ.set_index('method')
    assert rows.loc['testBroken', 'status'] == 'fail'
    assert 'crash' in rows.loc['testBroken', 'status_reason']
    assert rows.loc['antsRigid', 'dice_mean'] > 0
    long = pd.read_csv(out / 'sub-01/anat/sub-01_desc-registration_qc.tsv', sep='\t')
    assert set(long['method']) == {'antsRigid'}


def test_derivatives_pass_the_official_bids_validator(e2e):
    """The schema-based BIDS validator (``bids-validator-deno``, offline) finds no error in
    keyprep's derivatives (warnings, such as recommended keys, are allowed)."""
    import shutil
    import subprocess
    import sys

    exe = Path(sys.executable).parent / 'bids-validator-deno'
    exe = str(exe) if exe.exists() else shutil.which('bids-validator-deno')
    assert exe, 'bids-validator-deno is missing: scripts/install.sh installs it (.[test])'
    proc = subprocess.run([exe, str(e2e['out']), '--format', 'json'], capture_output=True,
                          text=True, timeout=600, check=False)
    report = json.loads(proc.stdout)
    errors = [(i['code'], i.get('location'), i.get('subCode'))
              for i in report['issues']['issues'] if i['severity'] == 'error']
    assert errors == []
    assert report['issues']['issues'], 'the validator reported nothing: did it run?'
