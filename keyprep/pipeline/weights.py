"""Weights files of the learned models: read safely, and checked before a run starts.

Every weights file (the label network's, KeyMorph's from ``--keymorph-weights`` or the
shipped one) is read with ``torch.load(..., weights_only=True)``: only tensors and plain
containers are unpickled, so a file crafted to run code when loaded is refused instead
of executed.

:func:`check_run_weights` checks the weights of every learned model a participant-level run
will use, before any node runs: a missing file is exit 66 (:class:`MissingInputError`), a
file that does not load, or lacks the keys and tensors of the model it is given for, exit 65
(:class:`WeightsError`), each with one line. The check builds each model on torch's
``meta`` device and compares names and shapes only: no tensor is computed, so no thread
pool starts in the process before Nipype forks its workers.

The SHA-256 of the files that are used is recorded where the results are: the label
network's in each ``seg-synthseg`` sidecar (``NetworkWeightsSha256``) and in the QC
summary (``synthseg_weights_sha256``), a learned engine's (KeyMorph, CARL, DIO: declared
with :class:`keyprep.pipeline.engines.LearnedModel`) in the record and JSON sidecars of
each of its transforms (``weights``: model, path, sha256), in the QC summary
(``engine_weights_sha256``) and in the run's ``keyprep.json`` (``weights``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import MissingInputError, WeightsError

__all__ = ['check_keymorph_weights', 'check_label_network_weights', 'check_run_weights',
           'models_used',
           'load_weights', 'sha256_file']


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, 'rb') as fh:
        for block in iter(lambda: fh.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def load_weights(path: str | Path, what: str, required: tuple[str, ...] = ('state_dict',),
                 hint: str = '') -> dict:
    """The dictionary stored in a weights file, read with ``weights_only=True``.

    Raises :class:`MissingInputError` (66) when there is no such file and
    :class:`WeightsError` (65) when it does not load (not a torch file, truncated, or
    holding objects other than tensors and plain containers) or lacks a ``required`` key.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f'{what} weights not found: {path}{hint}')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same input error
        raise WeightsError(f'{what} weights {path} cannot be loaded: {_load_failure(exc)}') \
            from None
    if not isinstance(payload, dict):
        raise WeightsError(f'{what} weights {path} hold a {type(payload).__name__}, not the '
                           'dictionary of a keyprep weights file')
    missing = [k for k in required if k not in payload]
    if missing:
        raise WeightsError(f'{what} weights {path} lack {", ".join(missing)}: not a keyprep '
                           f'{what} weights file')
    if not isinstance(payload['state_dict'], dict):
        raise WeightsError(f'{what} weights {path}: state_dict is not a dictionary of tensors')
    return payload


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words."""
    import re

    text = re.sub(r'\x1b\[[0-9;]*m', '', str(exc))
    found = re.search(r'Unsupported global: GLOBAL (\S+)', text)
    if found:
        return (f'it refers to {found.group(1)}, which is not loaded for safety (a weights '
                'file holds tensors and plain values only; this one would run code or build '
                'objects when loaded)')
    if 'Unsupported operand' in text or 'invalid load key' in text:
        return 'not a torch weights file (unreadable pickle data)'
    if 'zip archive' in text or 'PytorchStreamReader' in text:
        return 'damaged or not a torch weights file (not a valid zip archive)'
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), '')
    return f'damaged or not a torch weights file ({type(exc).__name__}: {first[:160]})'


def _compare_state(model, state: dict, what: str, path: Path) -> None:
    """The tensors of ``state`` have the names and shapes of ``model``'s (a model on the
    meta device: nothing is computed)."""
    import torch

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad_type = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_type:
        raise WeightsError(f'{what} weights {path}: {bad_type[0]} is not a tensor')
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f'{len(missing)} tensor(s) missing (e.g. {missing[0]})')
        if extra:
            parts.append(f'{len(extra)} unexpected tensor(s) (e.g. {extra[0]})')
        if wrong:
            k = wrong[0]
            parts.append(f'{len(wrong)} of another shape (e.g. {k}: '
                         f'{tuple(state[k].shape)} instead of {expected[k]})')
        raise WeightsError(f'{what} weights {path} do not fit the model they describe: '
                           + '; '.join(parts))


def check_keymorph_weights(path: str | Path | None = None) -> dict:
    """Check a KeyMorph weights file (default: the shipped one); return ``{'path',
    'sha256'}``. Raises :class:`MissingInputError` or :class:`WeightsError`."""
    import torch

    from .keymorph.network import FORMAT, MODEL_DIR, DetectorConfig, KeypointDetector, \
        default_weights

    path = Path(path) if path is not None else default_weights()
    payload = load_weights(path, 'KeyMorph', ('format', 'state_dict', 'detector'),
                           hint=f' (the shipped model is in {MODEL_DIR}; reinstall keyprep, '
                                'or give --keymorph-weights)')
    if payload.get('format') != FORMAT:
        raise WeightsError(f'{path} is not a keyprep KeyMorph weights file (format '
                           f'{payload.get("format")!r}, expected {FORMAT!r})')
    try:
        cfg = DetectorConfig.from_dict(payload['detector'])
        with torch.device('meta'):
            model = KeypointDetector(cfg)
    except Exception as exc:  # noqa: BLE001 - a detector description that does not build
        raise WeightsError(f'KeyMorph weights {path}: the detector they describe cannot be '
                           f'built ({type(exc).__name__}: {exc})') from None
    _compare_state(model, payload['state_dict'], 'KeyMorph', path)
    return {'path': str(path), 'sha256': sha256_file(path)}


def check_label_network_weights(path: str | Path | None = None) -> dict:
    """Check a label-network weights file (default: the shipped one); return ``{'path',
    'sha256'}``. Raises :class:`MissingInputError` or :class:`WeightsError`."""
    import torch

    from .synth.labeller import default_weights
    from .synth.unet import UNet3D, UNetConfig

    path = Path(path) if path is not None else default_weights()
    payload = load_weights(path, 'label-network', ('state_dict', 'unet', 'res_mm', 'labels'),
                           hint=' (they ship with keyprep: reinstall it)')
    try:
        cfg = UNetConfig(**payload['unet'])
        with torch.device('meta'):
            model = UNet3D(cfg)
        float(payload['res_mm'])
        [int(v) for v in payload['labels']]
    except Exception as exc:  # noqa: BLE001 - a network description that does not build
        raise WeightsError(f'label-network weights {path}: the network they describe cannot '
                           f'be built ({type(exc).__name__}: {exc})') from None
    _compare_state(model, payload['state_dict'], 'label-network', path)
    return {'path': str(path), 'sha256': sha256_file(path)}


def models_used(methods: list[str], target: str) -> list[str]:
    """The learned models (:func:`keyprep.pipeline.engines.learned_models`) whose weights a
    run with these engines and ``--target`` loads: those of its learned engines, and
    KeyMorph's for ``--target groupwise`` (its template is built from KeyMorph keypoints)."""
    from .engines import available_engines

    engines = available_engines()
    used = [engines[m].model for m in methods if m in engines and engines[m].model]
    if str(target).strip().split(':')[0] == 'groupwise':
        used.append('keymorph')
    return list(dict.fromkeys(used))


def uses_keymorph(methods: list[str], target: str) -> bool:
    """Whether a run with these engines and ``--target`` loads KeyMorph weights."""
    return 'keymorph' in models_used(methods, target)


def check_run_weights(opts) -> dict[str, dict]:
    """Check the weights of every learned model the run uses (parsed command-line options:
    ``methods``, ``target``, ``<model>_weights``); return ``{model: {'path', 'sha256'}}``
    and keep it as ``opts.weights``.

    The label network labels every image, so its weights are always checked; a learned
    engine's model when one of its engines is selected (KeyMorph's also for ``--target
    groupwise``). Nothing is checked with ``--reports-only``; ``--boilerplate-only``
    checks (a dry run finds bad weights).
    """
    from .engines import learned_models

    if getattr(opts, 'reports_only', False):
        return {}  # no model runs, no workflow is built
    checked = {'synthseg': check_label_network_weights()}
    models = learned_models()
    for name in models_used(list(getattr(opts, 'methods', []) or []),
                            getattr(opts, 'target', '')):
        checked[name] = models[name].check(getattr(opts, f'{name}_weights', None))
    opts.weights = checked
    return checked
