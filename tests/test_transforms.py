"""Transforms of every engine reproduce with ants.apply_transforms, in both directions."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from keyprep.pipeline.antsutils import import_ants
from keyprep.pipeline.engines import available_engines
from keyprep.pipeline.registration import run_engine
from keyprep.pipeline.transforms import (
    LPS,
    apply_transforms,
    identity_transform,
    jacobian_map,
    read_itk_affine,
)


def _data(path):
    return np.asanyarray(nb.load(str(path)).dataobj).astype(float).squeeze()


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _testable_engines() -> list[str]:
    """Every engine that can register here: engines without learned weights, KeyMorph's
    (with a tiny detector trained on the test brain), and learned engines whose weights
    ship (DIO since step 2250, run as its diffeomorphic variant alone; CARL since its
    ``cpu-dice`` weights, run without instance optimisation; its geometry is also tested with
    random networks in ``test_learned_engines.py``; these tests check that the motion is
    recovered)."""
    from keyprep.pipeline.engines import learned_models

    models = learned_models()
    return sorted(name for name, cls in available_engines().items()
                  if not cls.model or cls.model == 'keymorph'
                  or models[cls.model].default_weights().is_file())


def _weights_params(name: str, request) -> dict:
    if available_engines()[name].family == 'keymorph':
        return {'weights': str(request.getfixturevalue('keymorph_weights'))}
    if available_engines()[name].model == 'dio':  # one variant: run_engine's contract
        return {'representations': ['diffeo']}
    if available_engines()[name].model == 'carl':  # one variant: carl without IO
        return {'io_steps': 0, 'field_steps': 0}
    return {}


@pytest.fixture(scope='module', params=_testable_engines())
def engine_run(request, small_brains, tmp_path_factory):
    from keyprep.pipeline.engines import EngineOptions, get_engine

    out = tmp_path_factory.mktemp(request.param)
    params = _weights_params(request.param, request)
    init = get_engine(request.param).init_method(EngineOptions(params=params))
    extra = {}
    if init:  # as the workflow does: the starting method first
        first = run_engine(init, small_brains['fixed'], small_brains['moving'], out / 'init',
                           omp_nthreads=2, sloppy=True, seed=1,
                           params=_weights_params(init, request))
        extra = {'init_transform': first.fwd_xfm, 'init_method': init}
    run = run_engine(request.param, small_brains['fixed'], small_brains['moving'], out,
                     omp_nthreads=2, sloppy=True, seed=1, params=params, **extra)
    return run, out


def test_forward_transform_reproduces_engine_output(engine_run, small_brains):
    run, out = engine_run
    mine = apply_transforms(small_brains['moving'], small_brains['fixed'], [run.fwd_xfm],
                            out / 'rt_fwd.nii.gz')
    engine = _data(run.warped)
    assert np.abs(_data(mine) - engine).max() <= 1e-3 * np.abs(engine).max()


def test_registration_recovers_the_known_motion(engine_run, small_brains):
    run, out = engine_run
    identity = [identity_transform(out / 'id.txt')]
    before = _ncc(_data(small_brains['fixed']),
                  _data(apply_transforms(small_brains['moving'], small_brains['fixed'], identity,
                                         out / 'before.nii.gz')))
    after = _ncc(_data(small_brains['fixed']), _data(run.warped))
    assert after > 0.95 > before


def test_inverse_transform_brings_the_target_back(engine_run, small_brains):
    run, out = engine_run
    back = apply_transforms(small_brains['fixed'], small_brains['moving'], [run.inv_xfm],
                            out / 'rt_inv.nii.gz')
    assert _ncc(_data(back), _data(small_brains['moving'])) > 0.95
    if run.transform_kind == 'linear':
        composed = read_itk_affine(run.fwd_xfm) @ read_itk_affine(run.inv_xfm)
        assert np.allclose(composed, np.eye(4), atol=1e-4)


def test_linear_matrix_matches_the_known_rotation(engine_run):
    run, _ = engine_run
    if run.method != 'antsRigid':
        pytest.skip('closed-form check of the rigid engine')
    mat = read_itk_affine(run.fwd_xfm)[:3, :3]
    angle = np.degrees(np.arccos(np.clip((np.trace(mat) - 1) / 2, -1, 1)))
    assert angle == pytest.approx(12.0, abs=1.0)  # conftest rotates the moving brain by 12 deg
    assert np.linalg.det(mat) == pytest.approx(1.0, abs=1e-6)


def test_jacobian_map_of_linear_transform_is_its_determinant(engine_run, small_brains):
    run, _ = engine_run
    jac = jacobian_map(run.fwd_xfm, small_brains['fixed'], run.transform_kind)
    data = np.asanyarray(jac.dataobj)
    assert data.shape == nb.load(str(small_brains['fixed'])).shape
    if run.transform_kind == 'linear':
        assert np.allclose(data, np.linalg.det(read_itk_affine(run.fwd_xfm)[:3, :3]), atol=1e-5)
    else:
        assert 0.2 < data.min() and data.max() < 5


def test_read_itk_affine_matches_ants_point_mapping(tmp_path):
    ants = import_ants()
    mat = np.array([[0.9, -0.2, 0.05], [0.25, 1.1, 0.0], [0.0, 0.1, 0.95]])
    tx = ants.create_ants_transform(transform_type='AffineTransform', dimension=3, matrix=mat,
                                    translation=(3.0, -2.0, 1.5), center=(10.0, 5.0, -4.0))
    ants.write_transform(tx, str(tmp_path / 'a.txt'))
    ras = read_itk_affine(tmp_path / 'a.txt')
    for point in ([0.0, 0.0, 0.0], [12.0, -30.0, 7.5]):
        lps_in = LPS @ np.asarray(point)
        lps_out = np.asarray(tx.apply_to_point(tuple(lps_in)))
        assert np.allclose(ras[:3, :3] @ point + ras[:3, 3], LPS @ lps_out, atol=1e-6)


def _field_file(tmp_path, u_ras, affine):
    img = nb.Nifti1Image((u_ras @ LPS.T)[:, :, :, None, :].astype('f4'), affine)
    img.header.set_intent('vector')
    f = tmp_path / 'field.nii.gz'
    img.to_filename(f)
    ref = tmp_path / 'ref.nii.gz'
    nb.Nifti1Image(np.zeros(u_ras.shape[:3], 'f4'), affine).to_filename(ref)
    return f, ref


def test_jacobian_of_a_displacement_field_in_closed_form(tmp_path):
    """u(x) = (A - I) x has det J = det A everywhere; a sinusoid has an analytic J."""
    shape = (24, 26, 20)
    affine = np.array([[2.0, 0, 0, -24], [0, 1.5, 0, -20], [0, 0, 2.5, -25], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing='ij'), -1)
    x = ijk @ affine[:3, :3].T + affine[:3, 3]
    a = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.2]])
    field, ref = _field_file(tmp_path, x @ (a - np.eye(3)).T, affine)
    jac = np.asanyarray(jacobian_map(field, ref, 'deformable').dataobj)
    assert np.allclose(jac[2:-2, 2:-2, 2:-2], np.linalg.det(a), atol=1e-4)
    u = np.zeros_like(x)
    u[..., 0] = 3 * np.sin(x[..., 1] / 15.0)
    u[..., 1] = 2 * np.cos(x[..., 0] / 12.0)
    det = 1 - (3 / 15 * np.cos(x[..., 1] / 15)) * (-2 / 12 * np.sin(x[..., 0] / 12))
    field, ref = _field_file(tmp_path, u, affine)
    jac = np.asanyarray(jacobian_map(field, ref, 'deformable').dataobj)
    assert np.abs(jac - det)[2:-2, 2:-2, 2:-2].max() < 1e-3
