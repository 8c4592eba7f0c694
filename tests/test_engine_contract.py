"""The engine contract for deformable and learned engines, checked with plug-in engines:

* a deformable engine that returns no inverse gets one (fixed-point inversion of its
  field), with the round-trip error recorded in its record and QC row (before, an all-zero
  field was exported as the inverse without any error);
* an engine can start from another method's affine: the chain is composed into its
  exported transforms, recorded, and wired in the workflow; ``resolve_methods`` brings the
  starting engine along;
* a learned model declared once gets its ``--<name>-weights`` option, the start-up check
  (66 missing, 65 unusable), its checksum in Nipype's cache key and in the record.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from nipype.pipeline.engine.utils import generate_expanded_graph

from keyprep.pipeline.engines import base as engine_base
from keyprep.pipeline.engines.base import (
    Engine,
    EngineOptions,
    LearnedModel,
    RegistrationResult,
    register_engine,
    register_model,
    resolve_methods,
)

AMPLITUDE_MM = 3.0


def _smooth_field(reference: Path) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, fold-free RAS displacement field (mm) on the grid of ``reference``:
    sinusoids of amplitude 3 mm and wavelength 100-125 mm (|grad u| < 0.19), smooth enough
    for trilinear interpolation on a 4 mm grid to be accurate to ~0.02 mm."""
    img = nb.load(str(reference))
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in img.shape[:3]],
                               indexing='ij'), -1)
    x = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    u = np.stack([AMPLITUDE_MM * np.sin(x[..., 1] / 16.0),
                  AMPLITUDE_MM * np.cos(x[..., 2] / 20.0),
                  AMPLITUDE_MM * np.sin(x[..., 0] / 18.0)], -1)
    return u, img.affine


class _WarpNoInverse(Engine):
    """A deformable engine that returns a known smooth field and no inverse."""

    name = 'testWarpNoInverse'
    family = 'test'
    transform_kind = 'deformable'
    description = 'a known smooth displacement field, without its inverse'

    def run(self, fixed, moving, out_dir, options, fixed_mask=None, moving_mask=None):
        from keyprep.pipeline.transforms import apply_transforms, write_itk_displacement_field

        u, aff = _smooth_field(fixed)
        field = write_itk_displacement_field(u, aff, Path(out_dir) / 'field.nii.gz')
        warped = apply_transforms(moving, fixed, [field], Path(out_dir) / 'warped.nii.gz')
        return RegistrationResult([str(field)], [], [], str(warped))


class _WarpAfterAffine(_WarpNoInverse):
    """The same field, registered after another method's affine (default antsAffine)."""

    name = 'testWarpInit'
    default_init = 'antsAffine'

    def run(self, fixed, moving, out_dir, options, fixed_mask=None, moving_mask=None):
        from keyprep.pipeline.transforms import apply_transforms, write_itk_displacement_field

        pre = self.prealign(fixed, moving, out_dir, options)
        u, aff = _smooth_field(fixed)
        field = write_itk_displacement_field(u, aff, Path(out_dir) / 'field.nii.gz')
        warped = apply_transforms(pre, fixed, [field], Path(out_dir) / 'warped.nii.gz')
        return self.with_init(RegistrationResult([str(field)], [], [], str(warped)), options)


def _check_testnet(path=None) -> dict:
    from keyprep.pipeline.weights import load_weights, sha256_file

    path = Path(path) if path else Path('/nonexistent/testnet.pt')
    load_weights(path, 'testnet', ('state_dict',))
    return {'path': str(path), 'sha256': sha256_file(path)}


class _Learned(_WarpNoInverse):
    name = 'testLearned'
    model = 'testnet'


@pytest.fixture
def plugins():
    for cls in (_WarpNoInverse, _WarpAfterAffine, _Learned):
        register_engine(cls)
    register_model(LearnedModel('testnet', 'TestNet', lambda: Path('/nonexistent/testnet.pt'),
                                _check_testnet))
    yield
    for cls in (_WarpNoInverse, _WarpAfterAffine, _Learned):
        engine_base._REGISTRY.pop(cls.name, None)
    engine_base._MODELS.pop('testnet', None)


def _ramp(reference: Path, out: Path, axis: int) -> Path:
    """An image whose value is the RAS coordinate ``axis`` (mm): linear interpolation
    reproduces it exactly, so resampling it reads off where points went."""
    img = nb.load(str(reference))
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in img.shape[:3]],
                               indexing='ij'), -1)
    x = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    nb.Nifti1Image(x[..., axis].astype(np.float32), img.affine).to_filename(out)
    return out


def _interior(shape, margin=4) -> tuple[slice, ...]:
    return tuple(slice(margin, n - margin) for n in shape)


def test_deformable_engine_without_inverse_gets_one(plugins, small_brains, tmp_path):
    from keyprep.pipeline.registration import run_engine
    from keyprep.pipeline.transforms import (
        apply_transforms,
        identity_transform,
        read_displacement_field,
    )

    fixed = nb.load(str(small_brains['fixed']))
    mask = tmp_path / 'mask.nii.gz'
    nb.Nifti1Image((fixed.get_fdata() > 0).astype(np.uint8), fixed.affine).to_filename(mask)
    run = run_engine('testWarpNoInverse', small_brains['fixed'], small_brains['moving'],
                     tmp_path / 'run', fixed_mask=mask)
    assert run.inverse['source'] == 'fixed-point'
    assert run.inverse['fields'][0]['converged']
    v, _ = read_displacement_field(run.inv_xfm)
    assert np.abs(v).max() > 0.8 * AMPLITUDE_MM  # not the all-zero field of before
    ice = run.inverse['consistency']
    # trilinear interpolation of the fields on the 4 mm grids limits it (~0.05 mm here)
    assert ice['mean_mm'] < 0.1 and ice['p99_mm'] < 0.15
    # the round trip through ANTs: a coordinate ramp of the moving space, pulled onto the
    # fixed grid by the forward transform and back by the inverse, is the identity
    from scipy import ndimage as ndi

    moving = nb.load(str(small_brains['moving']))
    inside = ndi.binary_erosion(moving.get_fdata() > 0, iterations=2)  # within both FOVs
    for axis in range(3):
        ramp = _ramp(small_brains['moving'], tmp_path / f'ramp{axis}.nii.gz', axis)
        there = apply_transforms(ramp, small_brains['fixed'], [run.fwd_xfm],
                                 tmp_path / f'there{axis}.nii.gz')
        back = apply_transforms(there, small_brains['moving'], [run.inv_xfm],
                                tmp_path / f'back{axis}.nii.gz')
        err = (nb.load(str(back)).get_fdata() - nb.load(str(ramp)).get_fdata())
        assert np.abs(err[inside]).max() < 0.15, axis
        # with the old all-zero inverse the way back is the identity: off by the warp
        stay = apply_transforms(there, small_brains['moving'],
                                [identity_transform(tmp_path / 'id.txt')],
                                tmp_path / f'stay{axis}.nii.gz')
        err = nb.load(str(stay)).get_fdata() - nb.load(str(ramp)).get_fdata()
        assert np.abs(err[inside]).max() > 1.0


def test_fixed_point_inverse_matches_ants(tmp_path):
    """keyprep's fixed-point inverse agrees with ANTs' InvertDisplacementFieldImageFilter."""
    from keyprep.pipeline.antsutils import import_ants
    from keyprep.pipeline.inverse import invert_field_file
    from keyprep.pipeline.transforms import read_displacement_field, write_itk_displacement_field

    ants = import_ants(1)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = -45.0
    ref = tmp_path / 'ref.nii.gz'
    nb.Nifti1Image(np.zeros((31, 31, 31), np.float32), aff).to_filename(ref)
    u, _ = _smooth_field(ref)
    fwd = write_itk_displacement_field(u, aff, tmp_path / 'fwd.nii.gz')
    info = invert_field_file(fwd, tmp_path / 'inv.nii.gz')
    ours, _ = read_displacement_field(tmp_path / 'inv.nii.gz')
    field = ants.image_read(str(ref)).new_image_like(np.zeros((31, 31, 31), np.float32))
    disp = ants.from_numpy((u * [-1, -1, 1]).astype(np.float32), origin=field.origin,
                           spacing=field.spacing, direction=field.direction, has_components=True)
    theirs = ants.invert_displacement_field(disp, disp * 0, maximum_number_of_iterations=50,
                                            mean_error_tolerance_threshold=1e-6,
                                            max_error_tolerance_threshold=1e-5,
                                            enforce_boundary_condition=False)
    theirs = theirs.numpy() * [-1, -1, 1]
    inner = _interior(u.shape[:3], 3)
    assert info['converged'] and info['residual_max_mm'] < 0.05
    assert np.abs(ours[inner] - theirs[inner]).max() < 0.05


def test_linear_engine_inverse_still_required(plugins):
    from keyprep.pipeline.transforms import export_transforms

    with pytest.raises(ValueError, match='exactly one transform per direction'):
        export_transforms(['a.txt'], [], [], fixed='f', moving='m', out_fwd='x', out_inv='y',
                          kind='linear')


def test_start_from_another_engines_affine(plugins, small_brains, tmp_path):
    from keyprep.pipeline.registration import run_engine
    from keyprep.pipeline.transforms import (
        apply_transforms,
        read_displacement_field,
        write_itk_affine,
    )

    t = np.deg2rad(6.0)
    A = np.eye(4)
    A[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
    A[:3, 3] = [2.0, -3.0, 1.5]
    init = write_itk_affine(A, tmp_path / 'init.txt')
    with pytest.raises(ValueError, match='starts from the affine of antsAffine'):
        run_engine('testWarpInit', small_brains['fixed'], small_brains['moving'],
                   tmp_path / 'no_init')
    fixed = nb.load(str(small_brains['fixed']))
    mask = tmp_path / 'mask.nii.gz'
    nb.Nifti1Image((fixed.get_fdata() > 0).astype(np.uint8), fixed.affine).to_filename(mask)
    run = run_engine('testWarpInit', small_brains['fixed'], small_brains['moving'],
                     tmp_path / 'run', init_transform=init, init_method='myAffine',
                     fixed_mask=mask)
    assert run.chain == ['myAffine', 'testWarpInit']
    # the exported field is the chain composed: x -> A (x + u(x))
    U, aff = read_displacement_field(run.fwd_xfm)
    u, _ = _smooth_field(small_brains['fixed'])
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in U.shape[:3]],
                               indexing='ij'), -1)
    x = ijk @ aff[:3, :3].T + aff[:3, 3]
    expected = (x + u) @ A[:3, :3].T + A[:3, 3] - x
    assert np.abs(U - expected).max() < 1e-3
    # its inverse: the affine inverted exactly, the field by fixed-point iteration
    assert run.inverse['source'] == 'fixed-point'
    assert run.inverse['consistency']['mean_mm'] < 0.1, run.inverse
    assert run.inverse['consistency']['p99_mm'] < 0.2, run.inverse
    again = apply_transforms(small_brains['moving'], small_brains['fixed'], [run.fwd_xfm],
                             tmp_path / 'again.nii.gz')
    a, b = nb.load(str(again)).get_fdata(), nb.load(run.warped).get_fdata()
    inside = (a > 0) & (b > 0)
    # the same image (the engine resampled twice, the exported chain once)
    assert inside.sum() > 1000 and np.corrcoef(a[inside], b[inside])[0, 1] > 0.97


def test_resolve_methods_brings_the_starting_engine(plugins):
    from keyprep.pipeline.errors import UsageError

    assert resolve_methods(['testWarpInit']) == ['antsAffine', 'testWarpInit']
    assert resolve_methods(['antsSyN', 'testWarpInit', 'antsAffine']) == \
        ['antsSyN', 'antsAffine', 'testWarpInit']
    assert resolve_methods(['testWarpInit'], {'testWarpInit': {'init': 'none'}}) == \
        ['testWarpInit']
    assert resolve_methods(['testWarpInit'], {'testWarpInit': {'init': 'keymorphAffine'}}) == \
        ['keymorphAffine', 'testWarpInit']
    with pytest.raises(UsageError, match='antsSyN is deformable'):
        resolve_methods(['testWarpInit'], {'testWarpInit': {'init': 'antsSyN'}})
    with pytest.raises(UsageError, match='no engine gives'):
        resolve_methods(['testWarpInit'], {'testWarpInit': {'init': 'nothing'}})


def test_start_chain_in_cli_and_workflow(plugins, tmp_path):
    from keyprep.bids_app.parser import build_parser, parse_args

    from .test_workflows import _build, _groups

    assert '--testwarpinit-init' in build_parser().format_help()
    (tmp_path / 'ds').mkdir()
    opts = parse_args([str(tmp_path / 'ds'), str(tmp_path / 'o'), 'participant',
                       '--methods', 'testWarpInit', '--testwarpinit-init', 'antsRigid'])
    assert opts.methods == ['antsRigid', 'testWarpInit']
    assert opts.engine_params['testWarpInit'] == {'init': 'antsRigid'}
    wf = _build(tmp_path, _groups(tmp_path), opts.methods,
                engine_params=opts.engine_params)
    graph = generate_expanded_graph(wf._create_flat_graph())
    regs = [n for n in graph.nodes() if n.fullname.endswith('reg_T1w_testWarpInit_wf.register')]
    assert len(regs) == 2  # one per participant
    for node in regs:
        preds = {p.fullname for p in graph.predecessors(node)}
        assert any(p.endswith('reg_T1w_antsRigid_wf.register') for p in preds), preds
        assert node.inputs.init_method == 'antsRigid'
    with pytest.raises(ValueError, match='not run before it'):
        _build(tmp_path, _groups(tmp_path), ['testWarpInit'])


def test_learned_model_option_check_and_cache_key(plugins, small_brains, tmp_path, capsys):
    import torch

    from keyprep.bids_app.parser import build_parser, parse_args
    from keyprep.pipeline.errors import EXIT_NO_INPUT, KeyprepError, WeightsError
    from keyprep.pipeline.registration import run_engine
    from keyprep.pipeline.weights import check_run_weights

    assert '--testnet-weights' in build_parser().format_help()
    (tmp_path / 'ds').mkdir()
    argv = [str(tmp_path / 'ds'), str(tmp_path / 'o'), 'participant', '--methods', 'testLearned']
    with pytest.raises(KeyprepError, match='TestNet weights not found') as exc:
        parse_args(argv)  # the default file does not exist
    assert exc.value.exit_code == EXIT_NO_INPUT
    good = tmp_path / 'w.pt'
    torch.save({'state_dict': {'w': torch.zeros(2)}}, good)
    opts = parse_args([*argv, '--testnet-weights', str(good)])
    assert opts.engine_params['testLearned'] == {'weights': str(good)}
    checked = check_run_weights(opts)
    assert checked['testnet']['sha256'] == engine_base.get_engine('testLearned').cache_key(
        EngineOptions(params=opts.engine_params['testLearned']))['weights_sha256']
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a torch file')
    with pytest.raises(WeightsError):
        check_run_weights(parse_args([*argv, '--testnet-weights', str(bad)]))
    # new weights at the same path: another cache key (Nipype recomputes)
    engine = engine_base.get_engine('testLearned')
    before = engine.cache_key(EngineOptions(params={'weights': str(good)}))
    torch.save({'state_dict': {'w': torch.ones(2)}}, good)
    assert engine.cache_key(EngineOptions(params={'weights': str(good)})) != before
    run = run_engine('testLearned', small_brains['fixed'], small_brains['moving'],
                     tmp_path / 'run', params={'weights': str(good)})
    assert run.weights['model'] == 'testnet' and run.weights['path'] == str(good)
    assert run.weights['sha256'] == engine.cache_key(
        EngineOptions(params={'weights': str(good)}))['weights_sha256']


def test_qc_row_reports_the_inverse(tmp_path):
    from keyprep.pipeline.qcreport import SUMMARY_COLUMNS, registration_qc_rows

    shape = (12, 12, 12)
    lab = np.zeros(shape, np.int16)
    lab[2:10, 2:10, 2:10] = 2
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, data in (('dseg', lab), ('mask', (lab > 0).astype(np.uint8)),
                       ('jac', np.ones(shape, np.float32))):
        paths[name] = tmp_path / f'{name}.nii.gz'
        nb.Nifti1Image(data, aff).to_filename(paths[name])
    record = {'method': 'testWarpNoInverse', 'transform_kind': 'deformable', 'runtime_s': 1.0,
              'peak_mem_mb': 10.0, 'device': 'cpu', 'threads': 1, 'seed': 0, 'versions': {},
              'chain': ['antsAffine', 'testWarpNoInverse'],
              'weights': {'model': 'testnet', 'sha256': 'cd' * 32},
              'inverse': {'source': 'fixed-point',
                          'consistency': {'mean_mm': 0.03, 'p99_mm': 0.1, 'max_mm': 0.2}}}
    kw = dict(target_dseg=str(paths['dseg']), warped_dseg=str(paths['dseg']),
              target_mask=str(paths['mask']), jacobian=str(paths['jac']), label_set='tissue',
              lut={1: 'GM', 2: 'WM', 3: 'CSF'}, subject='01', session=None, source='x',
              target='tpl')
    _, summary = registration_qc_rows(record=record, **kw)
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    row = summary.iloc[0]
    assert row['inverse'] == 'fixed-point' and row['inverse_error_mean_mm'] == 0.03
    assert row['chain'] == 'antsAffine>testWarpNoInverse'
    assert row['engine_weights_sha256'] == 'cd' * 32 and row['status'] == 'pass'
    record['inverse']['consistency']['mean_mm'] = 1.7  # an inverse that does not invert
    _, summary = registration_qc_rows(record=record, **kw)
    assert summary.iloc[0]['status'] == 'warn'
    assert 'round-trip error 1.70 mm' in summary.iloc[0]['status_reason']
