"""The participant report built from a small output folder: tables that fit the page, one
number instead of a constant Jacobian mosaic, engines in the run's order, the demo's
comparison with the truth."""

from __future__ import annotations

import html
import json
import re

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from keyprep.bids_app import reports
from keyprep.pipeline.qcreport import SUMMARY_COLUMNS

TARGET = 'MNI152NLin2009aSym'
LONG_REASON = ('mean structure Dice 0.281 < 0.3; folding in 2.1% of the target brain; the '
               "label network's self-check failed on the moving image (left/right order)")


def _summary_row(method: str, kind: str, jac: tuple[float, float], status: str,
                 reason: str) -> dict:
    row = {c: 'n/a' for c in SUMMARY_COLUMNS}
    row.update({
        'participant_id': 'sub-01', 'session_id': 'n/a',
        'source': 'bids::sub-01/anat/sub-01_T1w.nii.gz',
        'method': method, 'target': TARGET, 'transform_kind': kind, 'label_set': 'synthseg',
        'dice_mean': 0.52, 'dice_min': 0.1, 'n_labels': 32, 'tissue_dice_mean': 0.7,
        'tissue_dice_min': 0.6, 'jac_min': jac[0], 'jac_max': jac[1], 'jac_mean': jac[0],
        'jac_neg_frac': 0.0, 'logjac_std': 0.0 if kind == 'linear' else 0.12,
        'runtime_s': 12.345, 'peak_mem_mb': 812.0, 'peak_gpu_mb': 0, 'device': 'cpu',
        'threads': 1, 'seed': 0, 'chain': method, 'status': status, 'status_reason': reason,
        'versions': 'keyprep 0.1.0, antspyx 0.6.3',
    })
    return row


@pytest.fixture()
def out_dir(tmp_path):
    out = tmp_path / 'out'
    anat, figs = out / 'sub-01' / 'anat', out / 'sub-01' / 'figures'
    anat.mkdir(parents=True)
    figs.mkdir()
    nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(
        anat / 'sub-01_desc-preproc_T1w.nii.gz')
    rows = [  # written in another order than the run's --methods
        _summary_row('antsSyN', 'deformable', (0.4, 1.3), 'pass', ''),
        _summary_row('antsAffine', 'linear', (1.07, 1.07), 'fail', LONG_REASON),
        _summary_row('antsRigid', 'linear', (1.0, 1.0), 'warn', 'mean structure Dice 0.41'),
    ]
    pd.DataFrame(rows).to_csv(anat / 'sub-01_desc-registrationsummary_qc.tsv', sep='\t',
                              index=False)
    long = pd.DataFrame([{'participant_id': 'sub-01', 'session_id': 'n/a',
                          'source': 'bids::sub-01/anat/sub-01_T1w.nii.gz', 'method': m,
                          'label_set': 'synthseg', 'label_index': k, 'label_name': name,
                          'dice': d, 'structure_group': 'x', 'target_cm3': 10.0,
                          'warped_cm3': 9.0}
                         for m, d in (('antsSyN', 0.8), ('antsAffine', 0.6), ('antsRigid', 0.5))
                         for k, name in ((17, 'Left-Hippocampus'), (53, 'Right-Hippocampus'))])
    long.to_csv(anat / 'sub-01_desc-registration_qc.tsv', sep='\t', index=False)
    png = (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00'
           b'\x00\x00\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7'
           b'5\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82')
    for m in ('antsRigid', 'antsAffine', 'antsSyN'):
        for suffix in ('T1w', 'jacobian'):
            (figs / f'sub-01_space-{TARGET}_desc-{m}_{suffix}.png').write_bytes(png)
    log = out / 'sub-01' / 'log' / '20260101-000000_x'
    log.mkdir(parents=True)
    (log / 'keyprep.json').write_text(json.dumps({
        'methods': ['antsRigid', 'antsAffine', 'antsSyN'], 'target': TARGET,
        'variants': {m: [m] for m in ('antsRigid', 'antsAffine', 'antsSyN')}}))
    return out


def _section(page: str, name: str) -> str:
    return page.split(f'<section id="{name}">', 1)[1].split('</section>', 1)[0]


def test_table_fits_the_page(out_dir):
    page = reports.render_participant_report(out_dir, '01').read_text()
    qc = _section(page, 'qc')
    summary = qc.split('<h3>', 2)[1]
    # the long reason is wrapped in a narrow cell, numbers are right-aligned and rounded
    assert f'<td class="wrap">{html.escape(LONG_REASON)}</td>' in summary
    assert '<td class="num">12.3</td>' in summary and '12.345' not in summary
    # short headers with their meaning as a tooltip and in a legend
    assert '<abbr title="why the status is not pass">reason</abbr>' in summary
    assert 'class="legend"' in summary and '<b>sd log J</b>' in summary
    # columns that are the same in every row are said once, above the table
    assert 'Same in every row:' in summary and 'device: cpu' in summary
    assert '<abbr title="device">' not in summary and '>device<' not in summary
    css = (reports._DATA / 'report.css').read_text()
    assert re.search(r'td\.wrap \{[^}]*max-width', css)


def test_label_driven_engine_is_flagged(out_dir):
    """An engine that aligned the label network's labels gets a column saying so (its
    structure Dice is not independent); a run without one shows no such column."""
    summary = _section(reports.render_participant_report(out_dir, '01').read_text(), 'qc')
    assert 'labels aligned' not in summary.split('<h3>', 2)[1]
    path = out_dir / 'sub-01' / 'anat' / 'sub-01_desc-registrationsummary_qc.tsv'
    table = pd.read_csv(path, sep='\t')
    table['labels_in_objective'] = table['method'] == 'antsSyN'
    table['structure_dice_mean'] = table['dice_mean']
    table.to_csv(path, sep='\t', index=False, na_rep='n/a')
    summary = _section(reports.render_participant_report(out_dir, '01').read_text(),
                       'qc').split('<h3>', 2)[1]
    assert 'labels aligned</abbr>' in summary
    assert 'structure labels (label prompting)' in summary
    # the group report's structure-Dice plot names the engines whose Dice is not independent
    from keyprep.bids_app.group import run_group

    assert run_group(out_dir) == 0
    page = (out_dir / 'group.html').read_text()
    assert ('Mean structure Dice (label network) per engine (antsSyN: the engine aligned '
            'these labels') in page


def test_linear_transform_gets_its_determinant_not_a_mosaic(out_dir):
    page = reports.render_participant_report(out_dir, '01').read_text()
    reg = _section(page, 'registration')
    blocks = {m: reg.split(f'with <code>{m}</code>', 1)[1].split('<div class="reg">', 1)[0]
              for m in ('antsRigid', 'antsAffine', 'antsSyN')}
    assert 'J = 1.0700 everywhere' in blocks['antsAffine']
    assert '7.0 % larger' in blocks['antsAffine']
    assert 'J = 1.0000 everywhere' in blocks['antsRigid']
    assert 'volumes are kept' in blocks['antsRigid']
    for m in ('antsRigid', 'antsAffine'):
        assert blocks[m].count('<img') == 1  # before/after only
        assert 'Jacobian determinant of the forward transform' not in blocks[m]
    assert blocks['antsSyN'].count('<img') == 2 and 'everywhere' not in blocks['antsSyN']


def test_engines_in_the_order_of_the_run(out_dir):
    page = reports.render_participant_report(out_dir, '01').read_text()
    order = ['antsRigid', 'antsAffine', 'antsSyN']

    def positions(text):
        return [text.index(m) for m in order]

    for part in (_section(page, 'summary').split('Registration status', 1)[1],
                 _section(page, 'registration'),
                 _section(page, 'qc').split('<h3>', 2)[1],  # the summary table
                 _section(page, 'qc').split('Table: Dice per structure', 1)[1]):
        assert positions(part) == sorted(positions(part)), part[:300]
    assert reports.method_order(['antsSyN', 'keymorphTPSlam1', 'antsRigid', 'zzz'],
                                ['antsRigid']) == ['antsRigid', 'antsSyN', 'keymorphTPSlam1',
                                                   'zzz']


def test_demo_truth_section(out_dir):
    assert 'id="truth"' not in reports.render_participant_report(out_dir, '01').read_text()
    pd.DataFrame([
        {'participant_id': 'sub-01', 'method': m, 'transform': 'linear', 'rotation_deg': 61.2,
         'error_mean_mm': e, 'error_median_mm': e, 'error_p99_mm': 2 * e,
         'error_max_mm': 3 * e, 'aal_dice_mean': 0.9, 'aal_dice_min': 0.5,
         'n_points': 1000}
        for m, e in (('antsSyN', 1.5), ('truth', 0.0), ('antsRigid', 31.0))]
    ).to_csv(out_dir / 'demo_desc-groundtruth_qc.tsv', sep='\t', index=False)
    page = reports.render_participant_report(out_dir, '01').read_text()
    truth = _section(page, 'truth')
    assert 'known truth' in truth and '<td class="num">31.0</td>' in truth
    assert truth.index('>truth<') < truth.index('>antsRigid<') < truth.index('>antsSyN<')
    assert 'href="#truth"' in page
