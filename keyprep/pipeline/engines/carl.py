"""CARL engines: coordinate attention with refinement layers (Greer et al.), after an affine.

One run gives two variants from one loaded network (:mod:`keyprep.pipeline.carl`):

* ``carl``: one forward pass of the network (both directions in one batch: the inverse is
  the network run with the images swapped, which GradICON training makes inverse
  consistent);
* ``carlIO``: the same after instance optimisation: ``io_steps`` Adam steps of LNCC +
  GradICON on this pair on a copy of the weights, reset for every pair (the paper's), then
  ``field_steps`` Adam steps of the same loss on a smooth correction of the two fields
  themselves (keyprep's field-space instance optimisation,
  :func:`keyprep.pipeline.carl.network.refine_field`).

CARL is [W,U]-equivariant to translations, not to rotations: it starts from another
engine's affine (``init``, default ``keymorphAffine``; :mod:`.fields`).

Parameters (``params``; the CLI's ``--carl-*`` options): ``weights`` (default: the shipped
model, :func:`keyprep.pipeline.carl.network.default_weights`), ``io_steps`` (weight-space IO,
the paper's kind: default 0, 5 measured, the paper's 50 on request; ``carlIO`` is dropped
when both ``io_steps`` and ``field_steps`` are 0), ``io_lr`` (default ``IO_LR_BUDGET /
io_steps``: 1e-4 for 5 steps; the paper's 2e-5 on request),
``init``, ``label_weight`` (label prompting of ``carlIO``: the weight of the soft Dice of the
label network's structure labels of both images in instance optimisation's loss, when the
workflow has them; default 1, 0 turns it off; ``carl`` itself never sees labels),
``symmetric`` (default on: export the symmetrised pair of fields,
:func:`keyprep.pipeline.carl.network.symmetrise`; see ``DEFAULT_SYMMETRIC``),
``passes`` (network passes per variant, default ``DEFAULT_PASSES``: keyprep's cascade),
``field_steps`` (default ``DEFAULT_FIELD_STEPS``; 0: the paper's IO alone), ``field_lr``
(voxels of the working grid per step, default ``DEFAULT_FIELD_LR``), ``field_level`` (the
correction lives on the working grid coarsened ``2**field_level`` times, default
``DEFAULT_FIELD_LEVEL``), ``field_label_weight`` (the label term's weight in the field
refinement, default ``DEFAULT_FIELD_LABEL_WEIGHT``),
``contrast_transfer`` (``auto``, ``moving``, ``both`` or ``off``: re-render the moving image, or
both images, in the fixed image's contrast from their structure labels before the network
sees them (``auto``: both, across contrasts),
:mod:`keyprep.pipeline.contrast`; keyprep's addition; see ``DEFAULT_CONTRAST_TRANSFER``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from .base import EngineOptions, LearnedModel, lazy, register_engine, register_model
from ..contrast import contrast_transfer_setting, transfer_boilerplate
from .fields import ArrayEngine

__all__ = ['CARL', 'DEFAULT_IO_STEPS']

#: keyprep's instance optimisation: 5 Adam steps at learning rate 1e-4 (the paper's is 50
#: steps at 2e-5: on one CPU thread about 15 minutes per 1 mm pair, never measured at that
#: size). Measured with the shipped weights on 4 held-out synthetic 1 mm pairs (structure
#: Dice, 32 structures; ``benchmarks/results/carl-io/``): 5 steps at 2e-5 gave carlIO 60.9
#: (carl 58.7), at 5e-4 65.4, at 1e-3 and 2e-3 worse. On 2026-12-07 1e-4 beat 5e-4 on the
#: same 4 pairs at today's defaults (contrast transfer, symmetrised export): 68.1 against
#: 67.3, 2e-4 in between; at 5e-4 Adam's first step raises IO's loss (2.25 -> 2.79 on one
#: pair) and the next ones only win it back, at 1e-4 the loss falls at every step
#: (``benchmarks/results/carl-io-lr/``).
#: Since 2026-12-07 (evening) the default is **0**: carlIO's instance optimisation is keyprep's
#: field-space one (``DEFAULT_FIELD_STEPS``), which gained 2.8-15.0 points over carl (7.0 on
#: average) on the 8 official held-out synthetic 1 mm pairs, where these 5 weight steps gained
#: 1.7 on average, in about half their time; the two
#: together were 0.2 points above the field refinement alone on 4 pairs, for twice the time
#: (``benchmarks/results/carl-field-io/``). ``--carl-io-steps 5`` gives the paper's kind of IO
#: at the setting above.
DEFAULT_IO_STEPS = 0
SLOPPY_IO_STEPS = 0
#: learning rate x steps of the measured setting (5 steps at 1e-4): other step counts get
#: ``IO_LR_BUDGET / io_steps`` (more steps are an extrapolation: 50 give 1e-5, half the
#: paper's 2e-5).
IO_LR_BUDGET = 5 * 1e-4
#: Default weight of carlIO's label term (soft Dice of the label network's structure maps, next
#: to the similarity and GradICON: the weight the ``cpu-dice`` training recipe gives it).
DEFAULT_IO_LABEL_WEIGHT = 1.0
#: Export the symmetrised pair of fields (:func:`keyprep.pipeline.carl.network.symmetrise`).
#: On by default: with the shipped weights (step 250) Colin27 registered to itself at 1 mm
#: moved 0.07 voxels on average (max 0.73) instead of 1.65 (max 4.3), and it raised carl's
#: Dice on both real known-truth pairs (AAL: field 71.7 -> 75.1, int060 81.8 -> 94.9; carlIO
#: 73.7 -> 76.0, 90.0 -> 95.0) and on the synthetic T1->T1 pairs (+0.8 / +2.6), for 1.0-4.1
#: points less on the synthetic T2->T1
#: pairs (benchmarks/results/carl-dice/). About 3 s per pair.
DEFAULT_SYMMETRIC = True
#: The weights carlIO adapts: ``'all'`` (the paper's) or ``'refine'`` (the refinement networks
#: only; the coordinate-attention step needs no backward pass, and its output, computed once
#: per pair, serves both variants). ``'refine'`` since 2026-12-07: with the step-575 weights
#: on the official 8 held-out synthetic 1 mm cases it gave 67.15 against 67.44 for ``'all'``
#: (32 structures) in about 0.6 of the time (``benchmarks/results/carl-io-lr/`` section 3),
#: and in one run with antsSyN (``benchmarks/results/carl-refine-same-run/``) it took
#: 0.43-0.58 of antsSyN's time.
DEFAULT_IO_TRAIN = 'refine'
#: Label-guided contrast transfer (:func:`keyprep.pipeline.contrast.label_contrast_transfer`):
#: ``'auto'`` re-renders both images in the fixed image's contrast when the two differ (and
#: both have label maps). Measured with the shipped weights on 2 held-out synthetic T2 -> T1
#: pairs at 1 mm (structure Dice, 32 structures; ``benchmarks/results/contrast-transfer/``):
#: carl 51.9 / 49.0 off, 66.1 / 64.9 moving, 67.9 / 65.4 both (affine start 66.0 / 64.3);
#: carlIO with both 67.4 / 67.3 (63.4 / 61.4 off).
DEFAULT_CONTRAST_TRANSFER = 'auto'
#: Network passes per variant (keyprep's cascade ``TwoStep{CARL, CARL}``: each further pass
#: registers the moving image warped by the fields so far, and the fields compose;
#: :func:`keyprep.pipeline.carl.network.register_arrays`).
DEFAULT_PASSES = 1
#: keyprep's field-space instance optimisation of carlIO (after the paper's weight-space one):
#: Adam steps on a correction of both fields, a displacement on the working grid coarsened
#: ``2**DEFAULT_FIELD_LEVEL`` times (8 mm at the 2 mm working grid) upsampled trilinearly,
#: ``DEFAULT_FIELD_LR`` working voxels per step, on the network's loss (squared LNCC both ways +
#: GradICON). See ``benchmarks/results/carl-field-io/`` for the measurements behind them.
DEFAULT_FIELD_STEPS = 20
DEFAULT_FIELD_LR = 0.1
DEFAULT_FIELD_LEVEL = 2
DEFAULT_FIELD_LABEL_WEIGHT = 0.0


register_model(LearnedModel('carl', 'CARL',
                           lazy('keyprep.pipeline.carl.network:default_weights'),
                           lazy('keyprep.pipeline.carl.network:check_carl_weights')))


@register_engine
class CARL(ArrayEngine):
    name = 'carl'
    family = 'carl'
    model = 'carl'
    description = ('CARL coordinate-attention registration with refinement layers '
                   '(Greer et al.), translation-equivariant, after an affine')
    citations = ('greer2024carl', 'tian2023gradicon')
    mem_gb = 4.0
    # label prompting of carlIO: the workflow passes the label network's maps (made for every
    # image anyway); unused when label_weight is 0 or IO is off
    uses_labels = True
    # contrast_transfer 'auto' depends on whether the two images' contrasts differ
    uses_contrasts = True

    def parameters(self, options: EngineOptions) -> dict:
        p = dict(options.params)
        params = {
            'weights': str(p['weights']) if p.get('weights') else None,
            'io_steps': int(p['io_steps']) if p.get('io_steps') is not None
            else (SLOPPY_IO_STEPS if options.sloppy else DEFAULT_IO_STEPS),
            'io_lr': p.get('io_lr'),
            'init': str(p.get('init') or self.default_init),
            'label_weight': (DEFAULT_IO_LABEL_WEIGHT if p.get('label_weight') is None
                             else p['label_weight']),
            'symmetric': DEFAULT_SYMMETRIC if p.get('symmetric') is None else p['symmetric'],
            'io_train': DEFAULT_IO_TRAIN if p.get('io_train') is None else p['io_train'],
            'passes': DEFAULT_PASSES if p.get('passes') is None else p['passes'],
            'field_steps': DEFAULT_FIELD_STEPS if p.get('field_steps') is None
            else p['field_steps'],
            'field_lr': DEFAULT_FIELD_LR if p.get('field_lr') is None else p['field_lr'],
            'field_level': DEFAULT_FIELD_LEVEL if p.get('field_level') is None
            else p['field_level'],
            'field_label_weight': (DEFAULT_FIELD_LABEL_WEIGHT
                                   if p.get('field_label_weight') is None
                                   else p['field_label_weight']),
            'contrast_transfer': contrast_transfer_setting(p.get('contrast_transfer'),
                                                           DEFAULT_CONTRAST_TRANSFER),
        }
        unknown = sorted(set(p) - set(params))
        if unknown:
            raise ValueError(f'{self.name}: unknown parameter(s) {", ".join(unknown)}')
        if params['io_steps'] < 0:
            raise ValueError('io_steps must be >= 0')
        if params['io_lr'] is None:
            params['io_lr'] = IO_LR_BUDGET / max(params['io_steps'], 1)
        try:
            ok = not isinstance(params['io_lr'], bool) and 0 < float(params['io_lr']) < math.inf
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f'io_lr must be a finite number > 0, not {params["io_lr"]!r}')
        params['io_lr'] = float(params['io_lr'])
        for key in ('label_weight', 'field_label_weight', 'field_lr'):
            weight = params[key]
            try:
                ok = not isinstance(weight, bool) and float(weight) >= 0 and math.isfinite(
                    float(weight)) and (key != 'field_lr' or float(weight) > 0)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f'{key} must be a finite number '
                                 f'{"> 0" if key == "field_lr" else ">= 0"}, not {weight!r}')
            params[key] = float(weight)
        for key, low in (('field_steps', 0), ('field_level', 0)):
            if (isinstance(params[key], bool) or not isinstance(params[key], int)
                    or params[key] < low):
                raise ValueError(f'{key} must be an integer >= {low}, not {params[key]!r}')
        if params['io_train'] not in ('all', 'refine'):
            raise ValueError(f"io_train must be 'all' or 'refine', not {params['io_train']!r}")
        if (isinstance(params['passes'], bool) or not isinstance(params['passes'], int)
                or params['passes'] < 1):
            raise ValueError(f'passes must be an integer >= 1, not {params["passes"]!r}')
        if not isinstance(params['symmetric'], bool):
            raise ValueError(f'symmetric must be true or false, not {params["symmetric"]!r}')
        return params

    def cache_key(self, options: EngineOptions) -> dict:
        """The weights' checksum and every resolved parameter (the defaults of the
        contrast transfer, passes and IO's learning rate decide the images and the fields):
        results made under other defaults are not taken from Nipype's cache."""
        params = self.parameters(options)
        params.pop('weights')  # the checksum stands for the weights
        return {**super().cache_key(options), **params}

    def variants(self, options: EngineOptions) -> list[tuple[str, dict]]:
        params = self.parameters(options)
        steps, field = params['io_steps'], params['field_steps']
        plain = ('carl', {'io_steps': 0, 'field_steps': 0})
        if steps == 0 and field == 0:
            return [plain]
        return [plain, ('carlIO', {'io_steps': steps, 'field_steps': field})]

    def boilerplate(self, options: EngineOptions | None) -> str:
        text = self.description
        if options is None:
            return text
        params = self.parameters(options)
        init = self.init_method(options)
        text += (f', starting from the affine of {init}' if init else '')
        if params['passes'] > 1:
            text += (f'; the network runs {params["passes"]} times in cascade, each pass '
                     'registering the moving image warped by the fields so far, and the fields '
                     'compose (keyprep\'s, not the paper\'s)')
        if params['io_steps']:
            text += (f'; carlIO adds {params["io_steps"]} steps of instance optimisation '
                     f'(Adam, learning rate {params["io_lr"]:g}, on '
                     + ('the refinement networks\' weights' if params['io_train'] == 'refine'
                        else 'all weights')
                     + '; LNCC + GradICON on each pair, weights reset per pair')
            if params['label_weight'] > 0:
                text += (f', with label prompting: the soft Dice of the structure labels of '
                         f'both images, weight {params["label_weight"]:g}')
            text += ')'
        if params['field_steps']:
            text += (f'; carlIO then refines the two fields themselves with '
                     f'{params["field_steps"]} Adam steps (learning rate '
                     f'{params["field_lr"]:g} voxels) of the same loss on a correction '
                     f'{2 ** params["field_level"]} times coarser than the working grid, '
                     'upsampled trilinearly (keyprep\'s field-space instance optimisation, not '
                     'in the paper)')
            if params['field_label_weight'] > 0:
                text += (f', with the structure labels\' soft Dice at weight '
                         f'{params["field_label_weight"]:g}')
        text += transfer_boilerplate(params['contrast_transfer'], 'registration')
        if params['symmetric']:
            text += ('; each variant exports the average of the network\'s forward field and '
                     'the inverse of its backward field, with that average\'s inverse '
                     '(keyprep\'s symmetrisation, not in the paper)')
        return text

    def run(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
            fixed_mask: Path | None = None, moving_mask: Path | None = None):
        import torch

        from ..carl.network import load_carl, register_arrays

        params = self.parameters(options)
        out_dir = Path(out_dir)
        t0 = time.time()
        f, m, affine, spacing = self.arrays(fixed, moving, out_dir, options, fixed_mask,
                                            moving_mask)
        device = torch.device(options.device)
        model, meta = load_carl(self.weights_path(options), device)
        t_load = time.time() - t0
        # instance optimisation uses the similarity the network was trained with (squared LNCC
        # for keyprep's recipes on pairs of different contrasts; the paper's LNCC otherwise)
        recipe = meta.get('recipe') if isinstance(meta, dict) else None
        io_similarity = (recipe or {}).get('similarity') or 'lncc'
        variants = self.variants(options)
        io_any = any(v['io_steps'] or v['field_steps'] for _, v in variants)
        labels, prompt = None, {'weight': 0.0, 'used': False, 'why': 'no instance optimisation'}
        if io_any:
            # the label term's weight in each kind of IO that runs (0 where it does not)
            w_io = params['label_weight'] if params['io_steps'] else 0.0
            w_field = params['field_label_weight'] if params['field_steps'] else 0.0
            labels, prompt = self.prompt_labels(fixed, out_dir, options, max(w_io, w_field))
            prompt = {**prompt, 'weight': w_io, 'field_weight': w_field}
            if max(w_io, w_field) <= 0:
                prompt['why'] = 'no label term in the instance optimisation that runs'
        # label-guided contrast transfer: the images painted in the fixed one's contrast
        f_orig, m_orig = f, m
        f, m, transfer = self.transfer_contrast(f, m, fixed, out_dir, options,
                                                params['contrast_transfer'], labels)
        mode = transfer['mode']
        # across contrasts the field refinement compares the real images, not the re-rendered
        # ones, when its similarity is blind to the sign of the correlation (squared LNCC, the
        # similarity of keyprep's recipes): on 4 held-out T2 -> T1 pairs 70.0 against 69.3
        # (benchmarks/results/carl-field-io/)
        field_images = (f_orig, m_orig) if mode != 'off' and io_similarity == 'lncc2' else None
        results = {}
        first_stage = {}  # the frozen first stage's output, computed once for the variants
        for name, vparams in variants:
            io = vparams['io_steps'] > 0 or vparams['field_steps'] > 0
            out = register_arrays(f, m, model, device=device, io_steps=vparams['io_steps'],
                                  io_lr=params['io_lr'], seed=options.seed,
                                  spacing_mm=spacing, io_similarity=io_similarity,
                                  labels=labels if io else None,
                                  io_label_weight=params['label_weight'] if io else 0.0,
                                  symmetric=params['symmetric'],
                                  io_train=params['io_train'], passes=params['passes'],
                                  first_stage=first_stage,
                                  field_steps=vparams['field_steps'],
                                  field_lr=params['field_lr'], field_level=params['field_level'],
                                  field_label_weight=(params['field_label_weight']
                                                      if io else 0.0),
                                  field_images=field_images)
            extras = {'timings_s': {k: round(v, 3) for k, v in out['timings'].items()},
                      'load_s': round(t_load, 3),
                      'network_inverse_consistency_vox': round(
                          float(out['inverse_consistency_vox']), 4),
                      'working_grid': out['working_grid'],
                      'model_step': meta.get('step') if isinstance(meta, dict) else None,
                      'passes': params['passes'],
                      # this variant's own time (its IO and network pass, not the shared
                      # loading, prealignment and first stage), for benchmarks that time
                      # variants apart
                      'variant_time_s': round(out['timings']['total_s']
                                              - out['timings']['first_stage_s'], 3),
                      'contrast_transfer': transfer,
                      # QC's structure Dice is not independent when the labels shaped the images
                      'labels_in_objective': mode != 'off'}
            if io:
                used = bool(prompt.get('used')) and out['label_channels'] > 0
                extras['label_prompt'] = {**prompt, 'used': used,
                                          'structures': out['label_channels']}
                extras['labels_in_objective'] = used or mode != 'off'
            if out['field_losses']:
                extras['field_io'] = {
                    'steps': vparams['field_steps'], 'lr': params['field_lr'],
                    'level': params['field_level'],
                    'label_weight': params['field_label_weight'],
                    'images': 'original' if field_images is not None else 'as registered',
                    'loss_first_last': [round(float(out['field_losses'][0]), 5),
                                        round(float(out['field_losses'][-1]), 5)]}
            if out['io_losses'] or out['field_losses']:
                extras['io_similarity'] = io_similarity
            if out['io_losses']:
                extras['io_loss_first_last'] = [round(float(out['io_losses'][0]), 5),
                                                round(float(out['io_losses'][-1]), 5)]
            results[name] = self.result(fixed, moving, out_dir, options, affine, name,
                                        out['disp_fwd'], out['disp_inv'], extras)
        return results
