"""The ANTs baselines run as ANTs' authors run them: antsRegistrationSyNQuick.sh's recipes
(rigid, affine, SyN) without metric masks by default; the other recipes and metric masks
are options. Each runs for real on a small Colin27 pair (4 mm, 12 degrees)."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from keyprep.pipeline.engines import EngineOptions, get_engine
from keyprep.pipeline.engines.ants import ANTS_PRESETS, DEFAULT_ANTS_PRESET
from keyprep.pipeline.registration import run_engine
from keyprep.pipeline.transforms import apply_transforms


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _data(path):
    return np.asanyarray(nb.load(str(path)).dataobj).astype(float).squeeze()


def test_default_is_the_quick_script_without_masks():
    assert DEFAULT_ANTS_PRESET == 'synquick'
    for name, kind in (('antsRigid', 'r'), ('antsAffine', 'a'), ('antsSyN', 's')):
        params = get_engine(name).parameters(EngineOptions())
        assert params['type_of_transform'] == f'antsRegistrationSyNQuick[{kind}]'
        assert params['masks'] is False and 'aff_iterations' not in params
    legacy = get_engine('antsSyN').parameters(EngineOptions(params={'preset': 'antspy'}))
    assert legacy['type_of_transform'] == 'SyN' and legacy['reg_iterations'] == (40, 20, 0)
    assert get_engine('antsAffine').parameters(
        EngineOptions(params={'preset': 'syn'}))['type_of_transform'] == 'antsRegistrationSyN[a]'
    assert set(ANTS_PRESETS) == {'synquick', 'syn', 'antspy'}
    with pytest.raises(ValueError, match='unknown ANTs preset'):
        get_engine('antsAffine').parameters(EngineOptions(params={'preset': 'fast'}))


@pytest.mark.parametrize('method,masks', [('antsAffine', False), ('antsAffine', True),
                                          ('antsSyN', False)])
def test_quick_recipe_registers_and_records_itself(method, masks, small_brains, tmp_path):
    fixed, moving = small_brains['fixed'], small_brains['moving']
    mask = tmp_path / 'mask.nii.gz'
    img = nb.load(str(fixed))
    nb.Nifti1Image((_data(fixed) > 0).astype(np.uint8), img.affine).to_filename(mask)
    mmask = tmp_path / 'mmask.nii.gz'
    mimg = nb.load(str(moving))
    nb.Nifti1Image((_data(moving) > 0).astype(np.uint8), mimg.affine).to_filename(mmask)
    run = run_engine(method, fixed, moving, tmp_path / 'out', omp_nthreads=2, seed=1,
                     params={'masks': masks}, fixed_mask=mask, moving_mask=mmask)
    assert run.extras['ants_preset'] == 'synquick'
    assert run.extras['metric_masks'] is masks
    kind = {'antsAffine': 'a', 'antsSyN': 's'}[method]
    assert run.extras['ants_type_of_transform'] == f'antsRegistrationSyNQuick[{kind}]'
    mine = apply_transforms(moving, fixed, [run.fwd_xfm], tmp_path / 'rt.nii.gz')
    before = _ncc(_data(fixed), _data(apply_transforms(moving, fixed, [], tmp_path / 'id.nii.gz')))
    after = _ncc(_data(fixed), _data(mine))
    assert after > 0.95 and after > before + 0.05, (before, after)


def test_seed_zero_is_reproducible(small_brains, tmp_path):
    """antsRegistration reads --random-seed 0 as "seed from the clock"; keyprep's default seed
    0 must still give the same registration twice (it once varied from run to run)."""
    from keyprep.pipeline.engines.ants import ants_random_seed

    assert ants_random_seed(0) == 1 and ants_random_seed(41) == 42
    assert all(ants_random_seed(s) > 0 for s in (0, 2 ** 31 - 2, 2 ** 40))
    fixed, moving = small_brains['fixed'], small_brains['moving']
    params = []
    for i in range(2):
        run = run_engine('antsRigid', fixed, moving, tmp_path / f'out{i}', omp_nthreads=1,
                         seed=0, sloppy=True)
        assert run.extras['ants_random_seed'] == 1
        params.append(_read_params(run.fwd_xfm))
    # bit-identical with one ITK thread; a process whose ITK started with more threads (ITK
    # fixes its count at import) differs by ~1e-4 from the order of summation, while a clock
    # seed moves the rigid parameters by ~1e-2 and more on this pair
    assert np.allclose(params[0], params[1], atol=2e-3), params


def _read_params(path):
    from keyprep.pipeline.antsutils import import_ants

    return np.asarray(import_ants().read_transform(str(path)).parameters)
