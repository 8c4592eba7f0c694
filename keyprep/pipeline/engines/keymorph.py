"""KeyMorph engines: learned keypoints and closed-form rigid, affine and thin-plate-spline
registration (Yu et al. 2022; Wang et al. 2023), with an optional test-time refinement.

Flow of one run: both brains are conformed to the detector's grid and their keypoints
detected (one forward pass of the network per image); the map ``T: fixed mm -> moving mm``
is fitted in closed form to the corresponding keypoints (:mod:`keyprep.pipeline.keymorph.
aligners`); transforms are written in both directions (an ITK affine each way for
``keymorphRigid``/``keymorphAffine``; for ``keymorphTPS`` a displacement field on the fixed
grid and its inverse on the moving grid, computed by fixed-point iteration with its error
measured); the moving image is warped with the forward file by ANTs, so the engine's output
is exactly what its transform gives.

Variants (:meth:`Engine.variants`):

* ``keymorphTPS`` with several ``lambdas`` gives one registration per lambda, all from the
  same keypoints (the kernel block of the grid evaluation is shared by every lambda):
  ``keymorphTPSlam0``, ``keymorphTPSlam0p1``... With one lambda the variant is
  ``keymorphTPS`` itself.
* With ``refine`` (``affine``: the rigid and affine engines; ``deformable``: those and the
  TPS), each result also gets a refined sibling ``<variant>Refined``
  (:mod:`keyprep.pipeline.keymorph.refine`); the unrefined results keep their names, so the
  two can be compared in the QC tables.

Parameters (``params``; the CLI's ``--keymorph-*`` options):

``weights``
    Weights file (default: the shipped model, :func:`~keyprep.pipeline.keymorph.network.
    default_weights`).
``lambdas``
    TPS regularisation weights, in the paper's normalised frame (default ``[1.0]``).
``n_keypoints``
    Use only this many of the detector's keypoints (spread over the brain by farthest-point
    sampling of the fixed keypoints); default: all. The structure centroids
    (``keypoint_source`` ``labels``/``both``) are always all used.
``refine``, ``refine_steps``, ``similarity``, ``refine_resolution_mm``
    Refinement mode (``none``, ``affine``, ``deformable``), its number of steps, its
    similarity (``auto``: LNCC for the same contrast, MIND otherwise) and its grid. Defaults:
    40 steps on a 2 mm grid for the linear corrections, 20 steps on a 4 mm grid for the
    deformable (SVF) correction of keymorphTPS.
``pose_search``
    ``labels`` (default): the head's pose comes from the structure label maps that keyprep's
    label network made of both images (:attr:`EngineOptions.labels`; the one pose estimate
    per image of a run): the rotation of a closed-form similarity fit to the centroids of their
    shared structures turns the detector grid of the moving image, which is then detected ONCE; without both
    label maps, or when the centroid fit is implausible, the ``cube`` search is used and the
    reason recorded (``pose_labels_fallback``).
    ``cube``: detect the moving keypoints on the 24 cube rotations of the detector
    grid and keep the fit with the best mutual information, so any starting orientation is
    within 62.8 degrees of a candidate (:mod:`keyprep.pipeline.keymorph.search`);
    ``none``: the axis-aligned grid only (the papers' KeyMorph, faster).
``keypoint_source``
    Which corresponding points the closed-form fit uses. ``detector``: the learned
    detector's keypoints only (the papers' KeyMorph). ``labels`` (default): the centroids of
    the structures that keyprep's label network labelled in both images (the points of the
    label pose fit; the detector is not run). ``both``: the union, each source carrying half
    of the fit's weight. When the label maps are missing or their centroid fit is
    implausible (the same test as the label pose), the detector's keypoints alone are used and
    the reason recorded (``keypoint_source_fallback``); the sidecar's ``keypoint_source_used``
    says what was used. Measured on held-out synthetic pairs
    (``benchmarks/results/intersubject-keypoint-source/``) and on the demo's real heads, the
    centroids are the more accurate keypoints (the learned detector is still undertrained:
    its model card says where it is bad), hence the default.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from .base import (
    Engine,
    EngineOptions,
    ExtraOutput,
    LearnedModel,
    RegistrationResult,
    lazy,
    register_engine,
    register_model,
)

__all__ = ['DEFAULT_LAMBDAS', 'DEFAULT_REFINE_STEPS', 'KeyMorphAffine', 'KeyMorphRigid',
           'KeyMorphTPS', 'lambda_label']

#: TPS regularisation used when ``lambdas`` is not given.
DEFAULT_LAMBDAS: tuple[float, ...] = (1.0,)
#: Steps of the test-time refinement (linear corrections, on a 2 mm grid).
DEFAULT_REFINE_STEPS = 40
#: Steps, grid (mm) and Adam rate (mm) of the deformable (SVF) refinement of keymorphTPS,
#: chosen on 6 held-out pairs (the sweep in ``benchmarks/results/intersubject-same-run/``):
#: 40 steps at 2 mm cost 36 s per refinement for about 1 Dice point more
DEFAULT_SVF_REFINE_STEPS = 20
DEFAULT_SVF_REFINE_RES_MM = 4.0
SVF_REFINE_LR = 0.5
#: Pose search used when ``pose_search`` is not given.
DEFAULT_POSE_SEARCH = 'labels'
#: Values of ``keypoint_source``.
KEYPOINT_SOURCES = ('detector', 'labels', 'both')
#: Keypoints used when ``keypoint_source`` is not given.
DEFAULT_KEYPOINT_SOURCE = 'labels'
#: Refinement steps with ``--sloppy`` (tests).
SLOPPY_REFINE_STEPS = 8
_REFINED = 'Refined'


def lambda_label(lam: float) -> str:
    """BIDS-alphanumeric label of a lambda, used in variant names.

    >>> [lambda_label(v) for v in (0, 0.1, 1, 10, 2.5e-5)]
    ['lam0', 'lam0p1', 'lam1', 'lam10', 'lam2p5em05']
    """
    text = f'{float(lam):g}'.replace('.', 'p').replace('-', 'm').replace('+', '')
    return f'lam{text}'


register_model(LearnedModel('keymorph', 'KeyMorph',
                           lazy('keyprep.pipeline.keymorph.network:default_weights'),
                           lazy('keyprep.pipeline.weights:check_keymorph_weights')))


class _KeyMorphEngine(Engine):
    family = 'keymorph'
    model = 'keymorph'
    uses_torch = True
    uses_contrasts = True
    uses_labels = True
    citations = ('yu2022keymorph', 'wang2023keymorph')
    #: ``'rigid'``, ``'affine'`` or ``'tps'``.
    fit_kind: ClassVar[str] = ''

    # ---------------------------------------------------------------- parameters
    def parameters(self, options: EngineOptions) -> dict:
        p = dict(options.params)
        params = {
            'weights': str(p['weights']) if p.get('weights') else None,
            'n_keypoints': int(p['n_keypoints']) if p.get('n_keypoints') else None,
            'refine': str(p.get('refine') or 'none'),
            'refine_steps': int(p['refine_steps']) if p.get('refine_steps') is not None
            else (SLOPPY_REFINE_STEPS if options.sloppy else
                  DEFAULT_SVF_REFINE_STEPS if self.fit_kind == 'tps' else DEFAULT_REFINE_STEPS),
            'similarity': str(p.get('similarity') or 'auto'),
            'refine_resolution_mm': float(p.get('refine_resolution_mm') or (
                DEFAULT_SVF_REFINE_RES_MM if self.fit_kind == 'tps' else 2.0)),
            'pose_search': str(p.get('pose_search') or DEFAULT_POSE_SEARCH),
            'keypoint_source': str(p.get('keypoint_source') or DEFAULT_KEYPOINT_SOURCE),
        }
        if self.fit_kind == 'tps':
            lams = p.get('lambdas')
            params['lambdas'] = [float(v) for v in (lams if lams else DEFAULT_LAMBDAS)]
            params['tps_kernel'] = str(p.get('tps_kernel') or 'r2logr')
        unknown = sorted(set(p) - set(params))
        if unknown:
            raise ValueError(f'{self.name}: unknown parameter(s) {", ".join(unknown)}')
        from ..keymorph.refine import REFINE_MODES, SIMILARITIES

        if params['refine'] not in REFINE_MODES:
            raise ValueError(f'refine must be one of {REFINE_MODES}, not {params["refine"]!r}')
        from ..keymorph.search import POSE_SEARCH

        if params['pose_search'] not in POSE_SEARCH:
            raise ValueError(f'pose_search must be one of {POSE_SEARCH}, '
                             f'not {params["pose_search"]!r}')
        if params['keypoint_source'] not in KEYPOINT_SOURCES:
            raise ValueError(f'keypoint_source must be one of {KEYPOINT_SOURCES}, '
                             f'not {params["keypoint_source"]!r}')
        if params['similarity'] not in SIMILARITIES:
            raise ValueError(f'similarity must be one of {SIMILARITIES}')
        if self.fit_kind == 'tps':
            if any(v < 0 for v in params['lambdas']) or \
                    len(set(params['lambdas'])) != len(params['lambdas']):
                raise ValueError('lambdas must be distinct values >= 0')
        return params

    def refines(self, params: dict) -> bool:
        """Whether this engine refines with the given ``refine`` mode."""
        mode = params['refine']
        return mode == 'deformable' or (mode == 'affine' and self.fit_kind != 'tps')

    def _base_variants(self, params: dict) -> list[tuple[str, dict]]:
        return [(self.name, {})]

    def variants(self, options: EngineOptions) -> list[tuple[str, dict]]:
        params = self.parameters(options)
        base = self._base_variants(params)
        if not self.refines(params):
            return base
        refined = [(name + _REFINED, {**vp, 'refined': True}) for name, vp in base]
        return [(name, {**vp, 'refined': False}) for name, vp in base] + refined

    def extra_outputs(self, options: EngineOptions) -> list[ExtraOutput]:
        from ..keymorph.keypoints import KEYPOINT_COLUMNS, STRUCTURE_COLUMN

        ents = {'desc': 'keypoints', 'extension': '.tsv'}
        columns = dict(KEYPOINT_COLUMNS)
        if self.parameters(options)['keypoint_source'] != 'detector':
            columns.update(STRUCTURE_COLUMN)
        return [
            ExtraOutput('keypoints_moving', 'moving', ents,
                        'KeyMorph keypoints of this image (world RAS mm of the image)',
                        dict(columns)),
            ExtraOutput('keypoints_fixed', 'fixed', ents,
                        'KeyMorph keypoints of the registration target, detected in the '
                        "same run (world RAS mm of the target)", dict(columns)),
        ]

    def boilerplate(self, options: EngineOptions | None) -> str:
        if options is None:
            return self.description
        params = self.parameters(options)
        text = self.description
        if self.fit_kind == 'tps':
            lams = ', '.join(f'{v:g}' for v in params['lambdas'])
            text += f' (lambda = {lams})'
        if params['n_keypoints']:
            text += f', {params["n_keypoints"]} keypoints'
        if params['keypoint_source'] == 'detector':
            text += ", the keypoints being those of keyprep's learned KeyMorph detector"
        elif params['keypoint_source'] == 'labels':
            text += (", the keypoints being the centroids of the structures labelled in both "
                     "images by keyprep's label network (the learned detector's keypoints when "
                     "the label maps are missing or their centroid fit is implausible)")
        elif params['keypoint_source'] == 'both':
            text += (", fitted to the learned keypoints together with the centroids of the "
                     "structures labelled in both images by keyprep's label network (each set "
                     "with half of the weight; the learned keypoints alone when the label maps "
                     "are missing or their centroid fit is implausible)")
        if params['pose_search'] == 'labels' and params['keypoint_source'] != 'labels':
            text += (", with the moving keypoints detected on the detector grid turned by the "
                     "rotation of a similarity fit to the centroids of the structures labelled in "
                     "both images by keyprep's label network (one detection per image; the "
                     "24-orientation cube search when labels are missing or the fit "
                     "implausible)")
        elif params['pose_search'] == 'cube':
            text += (', with the moving keypoints detected in the 24 cube orientations of the '
                     'detector grid and the fit of highest normalised mutual information kept '
                     '(any starting pose)')
        if self.refines(params):
            kind = ('a stationary-velocity-field correction' if self.fit_kind == 'tps'
                    else 'a rigid correction' if self.fit_kind == 'rigid'
                    else 'an affine correction')
            text += (f', and the same refined at test time by {kind} optimising LNCC (same '
                     'contrast) or MIND (different contrasts) on a '
                     f'{params["refine_resolution_mm"]:g} mm grid for '
                     f'{params["refine_steps"]} steps (results named {self.name}...Refined)')
        return text

    def cite(self, options: EngineOptions | None) -> tuple[str, ...]:
        keys = tuple(self.citations)
        if options is not None and self.refines(self.parameters(options)):
            keys += ('heinrich2012mind',) + (('arsigny2006',) if self.fit_kind == 'tps' else ())
        return keys

    # ---------------------------------------------------------------- run
    def run(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
            fixed_mask: Path | None = None, moving_mask: Path | None = None
            ) -> RegistrationResult | dict[str, RegistrationResult]:
        import nibabel as nb
        import numpy as np
        import torch

        from ..keymorph.keypoints import LABEL_INDEX_OFFSET, write_keypoints
        from ..keymorph.search import PoseSearch, label_pose

        params = self.parameters(options)
        variants = self.variants(options)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        device = torch.device(options.device)
        t0 = time.perf_counter()
        fimg, mimg = nb.load(str(fixed)), nb.load(str(moving))
        fmask = nb.load(str(fixed_mask)) if fixed_mask else None
        mmask = nb.load(str(moving_mask)) if moving_mask else None
        source = params['keypoint_source']
        mode = params['pose_search']
        # the label maps' centroid fit: the pose (pose_search 'labels') and the anatomical
        # keypoints (keypoint_source 'labels'/'both'), computed once
        lfit, why = None, ''
        if mode == 'labels' or source != 'detector':
            given = options.labels or {}
            if given.get('fixed') and given.get('moving'):
                try:
                    lfit = label_pose(nb.load(str(given['fixed'])), nb.load(str(given['moving'])))
                except Exception as exc:  # unreadable label maps: the detector, and why
                    why = f'label maps unreadable ({type(exc).__name__}: {exc})'
                else:
                    if not lfit.plausible:
                        why = lfit.problem
            else:
                why = 'no label map of the ' + ' and '.join(
                    k for k in ('fixed', 'moving') if not given.get(k)) + ' image'
        trusted = lfit is not None and lfit.plausible
        use_labels = source != 'detector' and trusted
        use_detector = source != 'labels' or not use_labels
        shared: dict = {'keypoint_source': source,
                        'keypoint_source_used': ('both' if use_labels and use_detector else
                                                 'labels' if use_labels else 'detector')}
        if source != 'detector' and not use_labels:
            shared['keypoint_source_fallback'] = why
        pts = {'fixed': [], 'moving': [], 'weights': [], 'index': [], 'structure': []}
        if use_detector:
            det = self._detect(params, fimg, mimg, fmask, mmask, device, lfit, why)
            shared.update(det.pop('extras'))
            pose = det['pose']
            idx = det['index']
            wpair = det['pair_weights']
            pts['fixed'].append(det['pf'][idx])
            pts['moving'].append(det['pm'][idx])
            pts['weights'].append(wpair / wpair.sum())
            pts['index'].append(idx)
            pts['structure'].append(np.zeros(idx.size, dtype=int))
        else:
            pose = PoseSearch(None, 0, np.asarray(lfit.rotation, dtype=float), [float('nan')],
                              lfit.time_s, mode='labels', label_fit=lfit)
            shared['model_sha256'] = ''
        if use_labels:
            labs = np.asarray(lfit.structures, dtype=int)
            pts['fixed'].append(np.asarray(lfit.fixed_points, dtype=float))
            pts['moving'].append(np.asarray(lfit.moving_points, dtype=float))
            pts['weights'].append(np.asarray(lfit.point_weights, dtype=float))
            pts['index'].append(LABEL_INDEX_OFFSET + labs)
            pts['structure'].append(labs)
        shared.update(pose.extras())
        cat = {k: np.concatenate(v) for k, v in pts.items()}
        # each source carries half of the fit's weight in 'both' (the weights sum to 1 each)
        weights = cat['weights'] / cat['weights'].sum()
        detect_s = time.perf_counter() - t0
        structure = cat['structure'] if source != 'detector' else None
        files = {
            'keypoints_fixed': str(write_keypoints(out_dir / 'keypoints_fixed.tsv', cat['fixed'],
                                                   weights * weights.size, cat['index'],
                                                   structure)),
            'keypoints_moving': str(write_keypoints(out_dir / 'keypoints_moving.tsv',
                                                    cat['moving'], weights * weights.size,
                                                    cat['index'], structure)),
        }
        src = torch.as_tensor(cat['fixed'], dtype=torch.float64)
        dst = torch.as_tensor(cat['moving'], dtype=torch.float64)
        shared.update({'n_keypoints': int(src.shape[0]),
                       'n_label_keypoints': int((cat['structure'] > 0).sum()),
                       'detect_time_s': round(detect_s, 3), 'n_variants': len(variants)})
        from ..keymorph.refine import choose_similarity

        ctx = _Context(fixed=Path(fixed), moving=Path(moving), fimg=fimg, mimg=mimg,
                       fmask=fmask, mmask=mmask, out_dir=out_dir, device=device, params=params,
                       similarity=choose_similarity(params['similarity'], options.contrasts))
        results = self._fit(ctx, src, dst, torch.as_tensor(weights * weights.size))
        out = {}
        for name, _ in variants:
            res = results[name]
            res.extras = {**shared, **res.extras}
            if name in ctx.warp_times:
                res.extras['warp_time_s'] = ctx.warp_times[name]
            res.files = dict(files)
            out[name] = res
        return out if len(out) > 1 else out[variants[0][0]]

    def _detect(self, params, fimg, mimg, fmask, mmask, device, lfit, why) -> dict:
        """The learned detector's keypoints of both images, the moving ones on the pose grid
        (the label fit's rotation when trusted and ``pose_search`` is ``labels``, else the
        cube search or the axis-aligned grid)."""
        import numpy as np
        import torch

        from ..keymorph.keypoints import farthest_point_subset
        from ..keymorph.network import Conformer, KeyMorphModel, pair_weights
        from ..keymorph.search import pose_from_labels, search_pose

        t0 = time.perf_counter()
        model = KeyMorphModel.load(params['weights'], device)
        t_load = time.perf_counter()
        fdet = model.detect_conformed(Conformer(fimg, model.cfg, fmask, device).grid())
        t_fixed = time.perf_counter()
        pf, wf_ = fdet['points_mm'], fdet['weights']
        index = np.arange(pf.shape[0])
        wanted = params['n_keypoints']
        if wanted:
            if wanted < 4:
                raise ValueError('at least 4 keypoints are needed')
            if wanted > pf.shape[0]:
                raise ValueError(f'{wanted} keypoints asked for; the model has {pf.shape[0]}')
            index = farthest_point_subset(pf, wanted)
        mconf = Conformer(mimg, model.cfg, mmask, device)
        t_mconf = time.perf_counter()
        mode = params['pose_search']
        pose = None
        if mode == 'labels':
            if lfit is not None and lfit.plausible:
                pose = pose_from_labels(model, mconf, lfit)
            mode = 'cube'
        if pose is None:
            pose = search_pose(model, fdet, mconf,
                               fit='rigid' if self.fit_kind == 'rigid' else 'affine',
                               candidates=mode, index=index)
            if params['pose_search'] == 'labels':
                pose.label_fit, pose.fallback = lfit, why
        pm, wm_ = pose.detection['points_mm'], pose.detection['weights']
        weighted = model.cfg.weighted != 'none'
        wpair = np.ones(index.size)
        if weighted:
            wpair = pair_weights(torch.as_tensor(wf_[index]),
                                 torch.as_tensor(wm_[index])).numpy().astype(float)
        return {'pf': pf, 'pm': pm, 'index': index, 'pair_weights': wpair, 'pose': pose,
                'extras': {'model_sha256': model.sha256, 'weighted_keypoints': weighted,
                           'model_load_time_s': round(t_load - t0, 3),
                           'fixed_detect_time_s': round(t_fixed - t_load, 3),
                           'moving_conform_time_s': round(t_mconf - t_fixed, 3)}}

    def _fit(self, ctx, src, dst, weights) -> dict[str, RegistrationResult]:
        raise NotImplementedError


class _Context:
    """What the fitting step of a run needs (images, folders, parameters)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self._refine_images = None
        #: seconds spent warping the moving image, by variant
        self.warp_times = {}

    def refine_images(self):
        """The pair on the refinement grid (prepared once per run)."""
        if self._refine_images is None:
            from ..keymorph.refine import prepare_images

            self._refine_images = prepare_images(
                self.fimg, self.mimg, self.fmask, self.mmask,
                res_mm=self.params['refine_resolution_mm'], device=self.device)
        return self._refine_images

    def warp(self, fwd: Path, name: str) -> Path:
        from ..transforms import apply_transforms

        t0 = time.perf_counter()
        out = apply_transforms(self.moving, self.fixed, [fwd],
                               self.out_dir / f'{name}_warped.nii.gz')
        self.warp_times[name] = round(time.perf_counter() - t0, 3)
        return out


def _keypoint_residual(mapped, dst) -> float:
    import numpy as np

    return float(np.linalg.norm(np.asarray(mapped) - np.asarray(dst), axis=-1).mean())


class _LinearKeyMorph(_KeyMorphEngine):
    transform_kind = 'linear'

    def _fit(self, ctx, src, dst, weights) -> dict[str, RegistrationResult]:
        import numpy as np

        from ..keymorph.aligners import affine_inverse, apply_affine, fit_affine, fit_rigid
        from ..keymorph.refine import refine_linear
        from ..transforms import write_itk_affine

        rigid = self.fit_kind == 'rigid'
        t0 = time.perf_counter()
        mat = (fit_rigid if rigid else fit_affine)(src, dst, weights)  # [3, 4] float64
        mats = {self.name: (mat.numpy(), {'refined': False})}
        fit_s = time.perf_counter() - t0
        if self.refines(ctx.params):
            t1 = time.perf_counter()
            ref = refine_linear(ctx.refine_images(), mats[self.name][0], rigid=rigid,
                                steps=ctx.params['refine_steps'], similarity=ctx.similarity)
            mats[self.name + _REFINED] = (ref.matrix, {
                'refined': True, 'refine_similarity': ref.similarity,
                'refine_steps': len(ref.losses) - 1,
                'refine_loss_start': round(ref.losses[0], 6),
                'refine_loss_end': round(min(ref.losses), 6),
                'refine_time_s': round(time.perf_counter() - t1, 3)})
        import torch

        results = {}
        for name, (m, extras) in mats.items():
            m = np.asarray(m, dtype=float)[:3]
            fwd = write_itk_affine(m, ctx.out_dir / f'{name}_fwd.txt')
            inv = write_itk_affine(affine_inverse(torch.as_tensor(m)).numpy(),
                                   ctx.out_dir / f'{name}_inv.txt')
            mapped = apply_affine(torch.as_tensor(m), src).numpy()
            extras = {**extras, 'fit_time_s': round(fit_s, 4),
                      'keypoint_residual_mm': round(_keypoint_residual(mapped, dst.numpy()), 4),
                      'determinant': round(float(np.linalg.det(m[:, :3])), 6)}
            results[name] = RegistrationResult([str(fwd)], [str(inv)], [False],
                                               str(ctx.warp(fwd, name)), extras=extras)
        return results


@register_engine
class KeyMorphRigid(_LinearKeyMorph):
    name = 'keymorphRigid'
    fit_kind = 'rigid'
    description = ('KeyMorph rigid registration: corresponding keypoints, weighted Procrustes fit '
                   '(proper rotation and translation)')
    mem_gb = 1.5


@register_engine
class KeyMorphAffine(_LinearKeyMorph):
    name = 'keymorphAffine'
    fit_kind = 'affine'
    description = ('KeyMorph affine registration: corresponding keypoints, least-squares affine '
                   'fit')
    mem_gb = 1.5


@register_engine
class KeyMorphTPS(_KeyMorphEngine):
    name = 'keymorphTPS'
    fit_kind = 'tps'
    transform_kind = 'deformable'
    description = ('KeyMorph thin-plate-spline registration: corresponding keypoints, regularised '
                   'TPS (r^2 log r kernel) for each lambda from one detection')
    citations = ('yu2022keymorph', 'wang2023keymorph', 'bookstein1989')
    mem_gb = 3.0

    def _base_variants(self, params: dict) -> list[tuple[str, dict]]:
        lams = params['lambdas']
        if len(lams) == 1:
            return [(self.name, {'lambda': lams[0]})]
        return [(self.name + lambda_label(v), {'lambda': v}) for v in lams]

    def _fit(self, ctx, src, dst, weights) -> dict[str, RegistrationResult]:
        import numpy as np
        import torch

        from ..keymorph.aligners import (
            displacement_grid,
            fit_tps,
            grid_world_points,
            invert_displacement,
        )
        from ..transforms import write_itk_displacement_field

        lams = ctx.params['lambdas']
        names = [n for n, _ in self._base_variants(ctx.params)]
        t0 = time.perf_counter()
        fit = fit_tps(src, dst, lams, weights, kernel=ctx.params['tps_kernel'])
        fshape, faff = ctx.fimg.shape[:3], np.asarray(ctx.fimg.affine, dtype=float)
        mshape, maff = ctx.mimg.shape[:3], np.asarray(ctx.mimg.affine, dtype=float)
        fields = displacement_grid(fit, faff, fshape, None, device=ctx.device)  # every lambda
        shared_s = time.perf_counter() - t0
        mmask = _mask_on(ctx.mmask, ctx.mimg)
        residuals = fit.residuals()[0].mean(-1).numpy()
        results = {}
        refine = self.refines(ctx.params)
        for i, (name, lam) in enumerate(zip(names, lams)):
            t1 = time.perf_counter()
            inverse = invert_displacement(fit, maff, mshape, i, mask=mmask, device=ctx.device)
            extras = {'lambda': lam, 'refined': False,
                      'keypoint_residual_mm': round(float(residuals[i]), 4),
                      'inverse_error_mean_mm': round(inverse.mean_error_mm, 4),
                      'inverse_error_max_mm': round(inverse.max_error_mm, 4),
                      'inverse_iterations': inverse.iterations,
                      'shared_fit_time_s': round(shared_s, 3)}
            fwd = write_itk_displacement_field(fields[i], faff, ctx.out_dir / f'{name}_fwd.nii.gz')
            inv = write_itk_displacement_field(inverse.field, maff,
                                               ctx.out_dir / f'{name}_inv.nii.gz')
            extras['variant_time_s'] = round(time.perf_counter() - t1, 3)
            results[name] = RegistrationResult([str(fwd)], [str(inv)], [False],
                                               str(ctx.warp(fwd, name)), extras=extras)
            if not refine:
                continue
            # refinement: T o psi, psi = exp(v) on the refinement grid
            from ..keymorph.refine import refine_svf

            t2 = time.perf_counter()
            images = ctx.refine_images()
            base = displacement_grid(fit, images.grid_affine, images.shape, i,
                                     device=ctx.device).permute(3, 0, 1, 2)[None]
            corr = refine_svf(images, base, steps=ctx.params['refine_steps'],
                              similarity=ctx.similarity, lr=SVF_REFINE_LR)
            one = fit.select(i)
            total = int(np.prod(fshape))
            ufield = torch.empty(total, 3, dtype=torch.float32)
            chunk = 65536
            with torch.no_grad():
                for start in range(0, total, chunk):
                    x = grid_world_points(fshape, faff, start, start + chunk, device=ctx.device)
                    z = corr.apply(x.float()).double()
                    tz = one.evaluate(z)[0, 0]
                    ufield[start:start + x.shape[0]] = (tz - x).float().cpu()
                # inverse: psi^-1(T^-1(y)); its error |T(psi(.)) - y| inside the moving brain
                ytot = int(np.prod(mshape))
                vfield = torch.empty(ytot, 3, dtype=torch.float32)
                errs = []
                inv_flat = inverse.field.reshape(-1, 3)
                mflat = None if mmask is None else torch.as_tensor(mmask.reshape(-1))
                for start in range(0, ytot, chunk):
                    y = grid_world_points(mshape, maff, start, start + chunk, device=ctx.device)
                    zt = y + inv_flat[start:start + y.shape[0]].to(y)
                    w = corr.apply(zt.float(), inverse=True).double()
                    vfield[start:start + y.shape[0]] = (w - y).float().cpu()
                    back = one.evaluate(corr.apply(w.float()).double())[0, 0]
                    e = torch.linalg.vector_norm(back - y, dim=1)
                    if mflat is not None:
                        e = e[mflat[start:start + y.shape[0]].to(e.device)]
                    errs.append(e.cpu())
            err = torch.cat(errs) if errs else torch.zeros(0)
            rname = name + _REFINED
            fwd = write_itk_displacement_field(ufield.reshape(tuple(fshape) + (3,)), faff,
                                               ctx.out_dir / f'{rname}_fwd.nii.gz')
            inv = write_itk_displacement_field(vfield.reshape(tuple(mshape) + (3,)), maff,
                                               ctx.out_dir / f'{rname}_inv.nii.gz')
            rextras = {**extras, 'refined': True, 'refine_similarity': corr.similarity,
                       'refine_steps': len(corr.losses) - 1,
                       'refine_loss_start': round(corr.losses[0], 6),
                       'refine_loss_end': round(min(corr.losses), 6),
                       'refine_max_correction_mm': round(corr.max_displacement_mm, 3),
                       'inverse_error_mean_mm': round(float(err.mean()) if err.numel()
                                                      else float('nan'), 4),
                       'inverse_error_max_mm': round(float(err.max()) if err.numel()
                                                     else float('nan'), 4),
                       'refine_time_s': round(time.perf_counter() - t2, 3)}
            rextras.pop('variant_time_s', None)
            results[rname] = RegistrationResult([str(fwd)], [str(inv)], [False],
                                                str(ctx.warp(fwd, rname)), extras=rextras)
        return results


def _mask_on(mask_img, img):
    """A boolean mask array on ``img``'s grid (``None`` without a mask or on another grid)."""
    import numpy as np

    if mask_img is None:
        return None
    data = np.asarray(mask_img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    if data.shape != img.shape[:3] or not np.allclose(mask_img.affine, img.affine, atol=1e-3):
        return None
    return data > 0
