"""Smoke test of ``benchmarks/run_registration_benchmark.py`` at 4 mm: one pair, one cheap
engine (antsRigid, sloppy), the reference rows, the TSV/Markdown outputs and resuming."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'run_registration_benchmark.py'

pytestmark = pytest.mark.skipif(
    not Path('/usr/share/mricron/templates/ch2bet.nii.gz').exists(),
    reason='Colin27 (apt-get install mricron-data) not installed')


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('run_registration_benchmark', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope='module')
def built(bench, tmp_path_factory):
    work = tmp_path_factory.mktemp('bench') / 'work'
    fixed = bench.build_fixed(work, 4.0)
    spec = next(p for p in bench.PAIRS if p.name == 'rot030')
    return work, fixed, bench.build_pair(spec, fixed, work, 4.0, seed=0)


def test_pair_builder(bench, built):
    _, fixed, pair = built
    tissue = np.asanyarray(nb.load(str(fixed.tissue)).dataobj)
    assert set(np.unique(tissue)) == {0, 1, 2, 3}
    moving = nb.load(str(pair.moving))
    assert moving.shape == nb.load(str(pair.moving_aal)).shape
    assert np.allclose(moving.header.get_zooms()[:3], pair.voxel_size, atol=1e-4)
    assert min(pair.voxel_size) >= 4.0 and max(pair.voxel_size) <= 5.0
    assert pair.parameters['motion']['angle_deg'] == pytest.approx(30.0)
    assert pair.truth_kind == 'linear' and pair.truth_fwd.suffix == '.txt'
    assert len(np.unique(np.asanyarray(nb.load(str(pair.moving_aal)).dataobj))) > 80


def test_rows(bench, built):
    work, fixed, pair = built
    rows = {m: bench.evaluate(m, pair, fixed, work, resolution=4.0, threads=1, sloppy=True)
            for m in ('none', 'truth', 'antsRigid')}
    for method, row in rows.items():
        assert set(row) == set(bench.COLUMNS)
        assert row['status'] == 'ok', row['status']
        assert row['pair'] == 'rot030' and row['rotation_deg'] == 30.0
        assert row['method'] == method and row['resolution_mm'] == 4.0 and row['sloppy']
        assert 0.0 <= row['dice_aal'] <= 1.0 and 0.0 <= row['dice_tissue'] <= 1.0
        assert row['jac_min'] == pytest.approx(row['jac_max'])  # linear transforms
        assert row['jac_neg_frac'] == 0.0
    none, truth, rigid = rows['none'], rows['truth'], rows['antsRigid']
    scale = truth['jac_min'] ** (1 / 3)  # the known scale of the pair
    assert scale == pytest.approx(pair.parameters['motion']['scale'], rel=1e-4)
    assert truth['dice_aal'] > 0.75 and truth['dice_tissue'] > 0.75
    assert none['dice_aal'] < truth['dice_aal'] - 0.3  # 30 degrees: far before registration
    assert none['jac_min'] == 1.0 and math.isnan(none['runtime_s'])
    assert rigid['runtime_s'] > 0 and rigid['peak_mem_mb'] > 0
    assert rigid['dice_aal'] > none['dice_aal'] + 0.3  # a 30 degree rotation is recovered
    assert rigid['jac_min'] == pytest.approx(1.0, abs=1e-4)  # rigid: no volume change


def test_main_writes_and_resumes(bench, tmp_path):
    args = ['--resolution', '4', '--quick', '--pairs', 'rot000', '--methods', 'antsRigid',
            '--threads', '1', '--out', str(tmp_path / 'results'), '--work-dir',
            str(tmp_path / 'work')]
    assert bench.main(args) == 0
    tsv = tmp_path / 'results' / 'registration_benchmark.tsv'
    md = tmp_path / 'results' / 'registration_benchmark.md'
    rows = bench.read_results(tsv)
    assert [r['method'] for r in rows] == ['none', 'truth', 'antsRigid']
    assert tsv.read_text().splitlines()[0].split('\t') == bench.COLUMNS
    text = md.read_text()
    assert '| rot000 |' in text and 'antsRigid' in text and 'cores' in text
    before = tsv.read_text()
    assert bench.main(args) == 0  # everything is there already: nothing is rerun
    assert tsv.read_text() == before
