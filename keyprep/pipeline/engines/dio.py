"""DIO engines: learned features registered by an iterative solver (Jena et al.), after an
affine.

One run computes the multi-scale features of both images once (:mod:`keyprep.pipeline.dio`)
and solves the registration of the feature images with each warp representation, switched
at test time without retraining:

* ``dio``: free-form displacement (inverted by fixed-point iteration on DIO's 2 mm working
  grid, where the field lives: on a 1 mm pair 2.6 s against 46 s for the registry's
  inversion of the exported 1 mm field, with the same round-trip error, 1.16 against
  1.04 mm mean over the grid of a warp with 1.8 % folding voxels);
* ``dioDiffeo``: stationary velocity field integrated by scaling and squaring (its inverse
  is the negated velocity, exact);
* ``dioAffine``: one affine on the features (exported as a displacement field, like the
  others: the engine's transforms are one kind).

Like CARL, DIO starts from another engine's affine (``init``, default ``keymorphAffine``).

Parameters (``params``): ``weights`` (default: the shipped model,
:func:`keyprep.pipeline.dio.network.default_weights`), ``representations`` (default all
three: ``ffd``, ``diffeo``, ``affine``), ``iterations`` (solver iterations per level;
default the model's; a quarter with ``--sloppy``), ``init``, ``label_weight`` (label
prompting: the weight ``lambda`` of the label-fidelity term added to the solver's feature
loss, on the label network's structure maps of both images when the workflow has them;
default :data:`DEFAULT_LABEL_WEIGHT`, 0 switches it off; see
:func:`keyprep.pipeline.dio.register.register_arrays`), ``image_weight`` (image prompting,
keyprep's addition: the weight ``mu`` of the images' own local squared normalised
cross-correlation added to the solver's objective; default :data:`DEFAULT_IMAGE_WEIGHT`,
0 is DIO's feature objective alone) and ``image_window`` (its box window in working voxels,
default :data:`DEFAULT_IMAGE_WINDOW`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from .base import EngineOptions, LearnedModel, lazy, register_engine, register_model
from ..contrast import contrast_transfer_setting, transfer_boilerplate
from .fields import ArrayEngine

__all__ = ['DIO', 'VARIANT_NAMES', 'DEFAULT_LABEL_WEIGHT', 'AUTO_LABEL_WEIGHTS',
           'AUTO_LABEL_WEIGHTS_FEATURES_ONLY', 'DEFAULT_IMAGE_WEIGHT', 'DEFAULT_IMAGE_WINDOW', 'resolve_label_weight']

#: Default weight of the label-fidelity (prompting) term: chosen from the images' contrasts
#: (:data:`AUTO_LABEL_WEIGHTS`); a number fixes it (0: features only).
DEFAULT_LABEL_WEIGHT = 'auto'
#: Label-guided contrast transfer before the feature network
#: (:func:`keyprep.pipeline.contrast.label_contrast_transfer`; keyprep's addition).
DEFAULT_CONTRAST_TRANSFER = 'off'
#: Weight of the image term (image prompting; 0: the features alone) and its window, in
#: working voxels (2 mm for the shipped model). Chosen on the real ``field`` pair (AAL Dice,
#: shipped weights, labels ``auto``): 90.9 at 0, 92.9 at 1, 93.6 at 4, 93.9 at 16; window 7
#: at weight 4: 93.5 (``benchmarks/results/dio-image-prompt/``).
DEFAULT_IMAGE_WEIGHT = 4.0
DEFAULT_IMAGE_WINDOW = 5
#: ``'auto'``'s weights with image prompting on (``image_weight > 0``, the default): none
#: within one contrast, where the images' local correlation carries what the labels added
#: (held-out synthetic pairs at 1 mm, T1->T1 structure Dice 77.3 / 76.1 without labels
#: against 77.0 / 76.0 with weight 1, in less time and memory), 16 across contrasts (T2->T1
#: 75.2 / 73.75 against 73.9 / 72.8 without; ``benchmarks/results/dio-image-prompt/``).
AUTO_LABEL_WEIGHTS = {'same': 0.0, 'cross': 16.0}
#: ``'auto'``'s weights without the image term (``image_weight`` 0, DIO's feature objective
#: alone): measured on held-out synthetic pairs at 1 and 2 mm with the shipped weights
#: (``benchmarks/results/dio-label-prompt/``): at 1 mm T1->T1 structure Dice 71.4 (0) /
#: 72.05 (1) / 71.8 (4) / 71.6 (16), T2->T1 53.2 / 68.55 / 69.5 / 70.0
AUTO_LABEL_WEIGHTS_FEATURES_ONLY = {'same': 1.0, 'cross': 16.0}


def resolve_label_weight(setting, contrasts: dict | None,
                         image_weight: float = DEFAULT_IMAGE_WEIGHT) -> tuple[float, str]:
    """The prompting weight of a ``label_weight`` setting (a number, or ``'auto'``) for
    images of ``contrasts`` (``{'fixed': 'T1w', 'moving': 'T2w'}``, BIDS suffixes, either may
    be missing) registered with image prompting of weight ``image_weight``, and why:
    ``(weight, reason)``. ``'auto'`` takes :data:`AUTO_LABEL_WEIGHTS` with the image term on,
    :data:`AUTO_LABEL_WEIGHTS_FEATURES_ONLY` without it."""
    if setting != 'auto':
        return float(setting), 'given'
    table, note = ((AUTO_LABEL_WEIGHTS, 'image term on') if image_weight > 0 else
                   (AUTO_LABEL_WEIGHTS_FEATURES_ONLY, 'features only'))
    fixed, moving = ((contrasts or {}).get(k) for k in ('fixed', 'moving'))
    if fixed and moving and str(fixed) != str(moving):
        return table['cross'], f'auto: {moving} to {fixed}, across contrasts, {note}'
    if fixed and moving:
        return table['same'], f'auto: {moving} to {fixed}, one contrast, {note}'
    return table['same'], f'auto: contrasts unknown, taken as one contrast, {note}'

#: Representation -> variant name.
VARIANT_NAMES = {'ffd': 'dio', 'diffeo': 'dioDiffeo', 'affine': 'dioAffine'}
#: how each representation's inverse is obtained (the free-form one also records its
#: fixed-point iterations and residual: :func:`keyprep.pipeline.dio.solver.invert_displacement`)
INVERSES = {'ffd': 'fixed-point inversion on the working grid',
            'diffeo': 'exp(-v): the negated stationary velocity integrated',
            'affine': 'the inverse matrix'}


register_model(LearnedModel('dio', 'DIO',
                           lazy('keyprep.pipeline.dio.network:default_weights'),
                           lazy('keyprep.pipeline.dio.network:check_dio_weights')))


def _solver_settings() -> dict:
    from dataclasses import asdict

    from ..dio.register import DEFAULT_SOLVER

    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(DEFAULT_SOLVER).items()}


def _prompt_channels() -> int:
    """The principal components kept with the label channels (``register_arrays``'s
    default): part of the cache key, so results made with another number are not reused."""
    import inspect

    from ..dio.register import register_arrays

    return int(inspect.signature(register_arrays).parameters['prompt_channels'].default)


def _image_settings(weight, window) -> tuple[float, int]:
    """``image_weight`` (a finite number >= 0) and ``image_window`` (an odd number of voxels
    >= 3) checked."""
    if weight is None:
        weight = DEFAULT_IMAGE_WEIGHT
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f'image_weight must be a finite number >= 0, not {weight!r}') from None
    if not 0 <= weight < math.inf:
        raise ValueError(f'image_weight must be a finite number >= 0, not {weight!r}')
    if window is None:
        window = DEFAULT_IMAGE_WINDOW
    if isinstance(window, bool) or not isinstance(window, (int, float)) \
            or window != int(window) or int(window) < 3 or int(window) % 2 == 0:
        raise ValueError(f'image_window must be an odd whole number of voxels >= 3, '
                         f'not {window!r}')
    return weight, int(window)


def _label_weight_setting(value) -> 'float | str':
    """A ``label_weight`` parameter checked: ``'auto'`` or a finite number >= 0."""
    if value is None:
        return DEFAULT_LABEL_WEIGHT
    if isinstance(value, str) and value.strip().lower() == 'auto':
        return 'auto'
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"label_weight must be 'auto' or a finite number >= 0, "
                         f'not {value!r}') from None
    if not 0 <= weight < math.inf:  # NaN and infinity too
        raise ValueError(f"label_weight must be 'auto' or a finite number >= 0, not {value!r}")
    return weight


@register_engine
class DIO(ArrayEngine):
    name = 'dio'
    family = 'dio'
    model = 'dio'
    description = ('DIO deep implicit optimisation (Jena et al.): learned multi-scale features '
                   'registered by an iterative solver, after an affine')
    citations = ('jena2024dio',)
    mem_gb = 4.0
    # label prompting: the workflow passes the label network's maps to every DIO run (they are
    # made for every image anyway); unused at label_weight 0, and DIO runs without them
    uses_labels = True
    # the 'auto' prompting weight depends on whether the two images' contrasts differ
    uses_contrasts = True

    def parameters(self, options: EngineOptions) -> dict:
        p = dict(options.params)
        reps = p.get('representations') or list(VARIANT_NAMES)
        params = {
            'weights': str(p['weights']) if p.get('weights') else None,
            'representations': [str(r) for r in dict.fromkeys(reps)],
            'iterations': p.get('iterations'),
            'init': str(p.get('init') or self.default_init),
            'label_weight': _label_weight_setting(p.get('label_weight')),
            'contrast_transfer': contrast_transfer_setting(p.get('contrast_transfer'),
                                                           DEFAULT_CONTRAST_TRANSFER),
        }
        params['image_weight'], params['image_window'] = _image_settings(
            p.get('image_weight'), p.get('image_window'))
        unknown = sorted(set(p) - set(params))
        if unknown:
            raise ValueError(f'{self.name}: unknown parameter(s) {", ".join(unknown)}')
        params['solver'] = _solver_settings()  # not a user's parameter: sidecar and cache_key
        bad = [r for r in params['representations'] if r not in VARIANT_NAMES]
        if bad:
            raise ValueError(f'representations must be among {list(VARIANT_NAMES)}, not {bad}')
        return params

    def cache_key(self, options: EngineOptions) -> dict:
        """The weights' checksum and the test-time solver's settings: results made with
        another solver are not taken from Nipype's cache."""
        params = self.parameters(options)
        return {**super().cache_key(options), 'solver': _solver_settings(),
                'contrast_transfer': params['contrast_transfer'],
                'image': [params['image_weight'], params['image_window']],
                'prompt_channels': _prompt_channels()}

    def variants(self, options: EngineOptions) -> list[tuple[str, dict]]:
        reps = self.parameters(options)['representations']
        if len(reps) == 1 and reps[0] == 'ffd':
            return [('dio', {'representation': 'ffd'})]
        return [(VARIANT_NAMES[r], {'representation': r}) for r in reps]

    def boilerplate(self, options: EngineOptions | None) -> str:
        text = self.description
        if options is None:
            return text
        init = self.init_method(options)
        reps = self.parameters(options)['representations']
        words = {'ffd': 'free-form displacement (dio)',
                 'diffeo': 'stationary velocity field, scaling and squaring (dioDiffeo)',
                 'affine': 'affine (dioAffine)'}
        text += (f', starting from the affine of {init}' if init else '')
        text += '; warp representations: ' + ', '.join(words[r] for r in reps)
        params = self.parameters(options)
        setting = params['label_weight']
        if setting == 'auto':
            table = (AUTO_LABEL_WEIGHTS if params['image_weight'] > 0
                     else AUTO_LABEL_WEIGHTS_FEATURES_ONLY)
            same, cross = table['same'], table['cross']
            if same > 0:
                text += ('; label prompting with the structure labels of both images (weight '
                         f'{same:g} for images of one contrast, {cross:g} across contrasts)')
            else:
                text += ('; label prompting with the structure labels of both images across '
                         f'contrasts (weight {cross:g}; none for images of one contrast)')
        elif setting > 0:
            text += (f'; label prompting (weight {setting:g}) with the structure labels of both '
                     'images')
        if params['image_weight'] > 0:
            text += (f"; image prompting (weight {params['image_weight']:g}): the local squared "
                     f"normalised cross-correlation of the images ({params['image_window']}-voxel "
                     "window) added to the feature objective")
        text += transfer_boilerplate(params['contrast_transfer'], 'the feature network')
        return text

    def run(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
            fixed_mask: Path | None = None, moving_mask: Path | None = None):
        import torch

        from ..dio.network import load_dio
        from ..dio.register import DEFAULT_SOLVER, register_arrays

        params = self.parameters(options)
        out_dir = Path(out_dir)
        t0 = time.time()
        f, m, affine, spacing = self.arrays(fixed, moving, out_dir, options, fixed_mask,
                                            moving_mask)
        device = torch.device(options.device)
        model = load_dio(self.weights_path(options), device)
        t_load = time.time() - t0
        iterations = params['iterations']
        if iterations is None and options.sloppy:  # a quarter of the model's iterations
            iterations = [max(1, int(v) // 4) for v in model.config.iterations]
        weight, reason = resolve_label_weight(params['label_weight'], options.contrasts,
                                             params['image_weight'])
        labels, prompt = self.prompt_labels(fixed, out_dir, options, weight)
        prompt['setting'] = params['label_weight']
        prompt['weight_from'] = reason
        f, m, transfer = self.transfer_contrast(f, m, fixed, out_dir, options,
                                                params['contrast_transfer'], labels)
        out = register_arrays(f, m, model, representations=params['representations'],
                              device=device, seed=options.seed, iterations=iterations,
                              spacing_mm=spacing, labels=labels,
                              label_weight=weight if labels else 0.0,
                              image_weight=params['image_weight'],
                              image_window=params['image_window'])
        prompt['structures'] = out['label_channels']
        timings = {k: round(v, 3) for k, v in out['timings'].items()}
        results = {}
        for name, vparams in self.variants(options):
            rep = vparams['representation']
            entry = out[rep]
            extras = {'representation': rep, 'timings_s': timings, 'load_s': round(t_load, 3),
                      'solver_iterations': entry.get('iterations'),
                      'feature_loss': (round(float(entry['loss']), 6)
                                       if entry.get('loss') is not None else None),
                      # this representation's own solver time (the features are shared)
                      'variant_time_s': round(float(entry.get('seconds') or 0.0), 3),
                      'label_prompt': prompt,
                      'image_prompt': {'weight': out['image_weight'],
                                       'window_vox': out['image_window']},
                      # QC's structure Dice is not independent when those labels were aligned
                      'labels_in_objective': bool(prompt.get('used'))
                      or transfer['mode'] != 'off',
                      'contrast_transfer': transfer,
                      'solver_channels': out['solver_channels'],
                      'solver_kept_variance': out['kept_variance'],
                      'svf_gradient': DEFAULT_SOLVER.svf_gradient,
                      'sigma_velocity': DEFAULT_SOLVER.sigma_velocity,
                      'inverse': entry.get('inverse') or {'method': INVERSES[rep]}}
            results[name] = self.result(fixed, moving, out_dir, options, affine, name,
                                        entry['disp_fwd'], entry.get('disp_inv'), extras)
        return results
