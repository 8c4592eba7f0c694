"""Inference of keyprep's SynthSeg-style label network on any image.

The network works on an axis-aligned RAS grid at its training resolution (2 mm for the shipped
CPU model) covering the image's field of view. The image is low-pass filtered to that
resolution, resampled, intensity-normalised ([0, 1] between its minimum and a robust maximum),
labelled (optionally averaged with its left/right mirror, labels swapped), and the class
probabilities are resampled trilinearly back to the image's own grid before the arg-max, so
labels come out on the native grid with sub-voxel boundaries; labels outside the largest
labelled component are removed. The brain mask (:func:`brain_mask_from_labels`) is the
labelled brain without the extra-cerebral CSF class, closed by 2 mm, holes filled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ..masks import largest_component_filled
from ..weights import load_weights, sha256_file
from ..resources import autocast, resolve_precision
from .generator import gaussian_blur, identity_grid, sample_field
from .inference import sliding_window_probabilities
from .labels import flip_lut
from .selfcheck import check_labels
from .unet import UNet3D, UNetConfig

__all__ = ['LabelNetwork', 'LabelResult', 'default_weights', 'label_image', 'MODEL_DIR',
           'read_model_card', 'card_trusted', 'TRUSTED_DICE']

MODEL_DIR = Path(__file__).resolve().parents[2] / 'models' / 'synthseg'
WEIGHTS_NAME = 'keyprep-synthseg-2mm.pt'


def default_weights() -> Path:
    """The weights that ship inside the package."""
    return MODEL_DIR / WEIGHTS_NAME


TRUSTED_DICE = 0.70
#: Below this template correlation the pose search falls back to the header's orientation.
MIN_POSE_SCORE = 0.30


def read_model_card(weights: str | Path | None = None, sha256: str | None = None) -> dict:
    """The machine-readable model card beside the weights (``<name>.json``) if it describes
    this very file (same sha256), else ``{}``. Needs no torch."""
    import json

    path = Path(weights) if weights is not None else default_weights()
    card_path = path.with_suffix('.json')
    if not card_path.is_file() or not path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text())
    except ValueError:
        return {}
    return card if card.get('sha256') == (sha256 or sha256_file(path)) else {}


def card_trusted(card: dict) -> bool:
    """Whether a model card's held-out structure Dice reaches :data:`TRUSTED_DICE`."""
    value = card.get('heldout_mean_structure_dice')
    return value is not None and float(value) >= TRUSTED_DICE


BRAIN_MASK_CLOSING_MM = 2.0  # sulcal CSF between the gyri joins the brain mask


def brain_mask_from_labels(labels: np.ndarray, zooms=(1.0, 1.0, 1.0),
                           closing_mm: float = BRAIN_MASK_CLOSING_MM) -> np.ndarray:
    """The brain mask of a label map, as skull strippers define it (BET, deepbet).

    Every labelled structure except the CSF class (FreeSurfer 24, which in SynthSeg's protocol
    is mostly the extra-cerebral CSF between brain and skull), closed with a ball of
    ``closing_mm`` (to take in the sulcal CSF between gyri), its largest connected component,
    holes filled (ventricles). With the CSF class included the mask reached Dice 0.900 against
    Colin27's ch2bet; without it 0.941, closed by 2 mm 0.949 (step-25000 network).
    """
    from scipy import ndimage

    brain = (labels > 0) & (labels != 24)
    if not brain.any():
        return brain
    radius = np.maximum(np.round(closing_mm / np.asarray(zooms, dtype=float)), 0).astype(int)
    if radius.any():
        grid = np.ogrid[tuple(slice(-int(r), int(r) + 1) for r in radius)]
        ball = sum((g * z / closing_mm) ** 2 for g, z in zip(grid, zooms)) <= 1.0 + 1e-6
        pad = [(int(r), int(r)) for r in radius]
        brain = ndimage.binary_closing(np.pad(brain, pad), structure=ball)[
            tuple(slice(int(r), int(r) + n) for r, n in zip(radius, labels.shape))]
    return largest_component_filled(brain)


@dataclass
class LabelResult:
    labels: nib.Nifti1Image  # FreeSurfer numbering, native grid, int16
    mask: nib.Nifti1Image  # brain mask, native grid, uint8
    timings: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None  # network-grid probabilities (if asked)
    network_affine: np.ndarray | None = None
    pose: dict | None = None  # the pose searches, when the header's pose failed the check
    check: dict | None = None  # the self-check of the returned labels (:mod:`.selfcheck`)


def load_weights_file(path: Path) -> dict:
    """Read a label-network weights file safely (``weights_only=True``: no code runs):
    :func:`keyprep.pipeline.weights.load_weights` (66 when missing, 65 when unreadable)."""
    return load_weights(path, 'label-network', hint=' (they ship with keyprep; reinstall it, or pass '
                        'the path of weights trained with `keyprep train synthseg`)')


#: self-checks whose failure means a wrong pose (the others: wrong or poor labels)
POSE_CHECKS = frozenset({'left_right', 'superior_inferior', 'anterior_posterior',
                         'intensity_fit'})


def _rotation_deg(matrix: np.ndarray) -> float:
    """Angle (degrees) of the rotation in a 4x4 affine (its nearest rotation, so scaling
    and shear do not count).

    >>> import numpy as np
    >>> m = np.eye(4); m[:3, :3] = [[0, -2, 0], [2, 0, 0], [0, 0, 2]]
    >>> round(_rotation_deg(m), 6)
    90.0
    """
    u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=float)[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:  # a reflection: as far from the header as it gets
        return 180.0
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


#: Volumes (cm^3) of a reference brain mask that :meth:`LabelNetwork._region` accepts as a
#: brain's: an adult intracranial volume is up to about 2100 cm^3, a whole-head mask 3500 or
#: more.
REGION_MASK_CM3 = (400.0, 3500.0)
#: Labellings ``LabelNetwork.predict(pose='auto')`` may make: the header's pose, then up to
#: five searched poses (each costs one labelling, 30-60 s at 1 mm on 2 cores; only images
#: whose header pose fails an orientation check pay for any).
MAX_POSE_ATTEMPTS = 6


class LabelNetwork:
    """The trained U-Net with its geometry; ``weights=None`` uses the shipped model."""

    _cache: dict[tuple[str, str], 'LabelNetwork'] = {}

    #: Overlap of neighbouring inference tiles (fraction of the tile size).
    TILE_OVERLAP = 0.5

    def __init__(self, weights: str | Path | None = None, device: str = 'cpu', precision: str = 'auto'):
        path = Path(weights) if weights is not None else default_weights()
        payload = load_weights_file(path)
        self.path = path
        self.sha256 = sha256_file(path)
        self._setup(payload, device, precision)
        self.model.load_state_dict({k: v.float() for k, v in payload['state_dict'].items()})
        self.model.to(self.device).eval()
        self.card = self._read_card(path)

    def _setup(self, payload: dict, device: str, precision: str) -> None:
        self.device = torch.device(device)
        #: 'bf16': convolutions under bfloat16 autocast ('auto': where the hardware runs it natively)
        self.precision = resolve_precision(precision, str(self.device))
        self.config = UNetConfig(**payload['unet'])
        self.res_mm = float(payload['res_mm'])
        self.labels = tuple(int(v) for v in payload['labels'])
        self.step = int(payload.get('step', -1))
        #: inference tile = the training crop (weights exported before tiling: 64^3)
        self.tile = tuple(int(v) for v in payload.get('crop_shape', (64, 64, 64)))
        if 'state_dict' in payload:
            self.model = UNet3D(self.config)
        self.flip = torch.as_tensor(flip_lut(self.labels), device=self.device)

    @classmethod
    def from_model(cls, model: UNet3D, res_mm: float, crop_shape, labels=None, step: int = -1,
                   device: str = 'cpu', precision: str = 'fp32') -> 'LabelNetwork':
        """Wrap a network in memory (training validation goes through :meth:`predict`, the
        deployment path, with this)."""
        from .labels import OUTPUT_LABELS

        self = cls.__new__(cls)
        self.path = Path('<in-memory>')
        self.sha256 = ''
        self._setup({'unet': model.config.to_dict(), 'res_mm': res_mm,
                     'labels': list(labels or OUTPUT_LABELS), 'step': step,
                     'crop_shape': list(crop_shape)}, device, precision)
        self.model = model
        self.card = {}
        return self

    TRUSTED_DICE = TRUSTED_DICE  # held-out structure Dice needed to set the QC status
    REGION_MARGIN_MM = 10.0  # labels stay within this distance of the reference brain mask
    #: searched poses closer than this to the header's are not tried (training rotates +-20 deg)
    MIN_POSE_CHANGE_DEG = 30.0

    def _read_card(self, path: Path) -> dict:
        return read_model_card(path, self.sha256)

    @property
    def heldout_dice(self) -> float | None:
        """Mean structure Dice on held-out synthetic volumes, from the model card."""
        value = self.card.get('heldout_mean_structure_dice')
        return None if value is None else float(value)

    @property
    def trusted(self) -> bool:
        """Whether the labels are good enough to decide keyprep's QC status."""
        return card_trusted(self.card)

    @classmethod
    def cached(cls, weights: str | Path | None = None, device: str = 'cpu') -> 'LabelNetwork':
        key = (str(weights or default_weights()), str(device))
        if key not in cls._cache:
            cls._cache[key] = cls(weights, device)
        return cls._cache[key]

    # ------------------------------------------------------------------ geometry
    def network_grid(self, img: nib.spatialimages.SpatialImage) -> tuple[tuple[int, int, int], np.ndarray]:
        """Shape and affine of the RAS grid (``res_mm``) covering the image's field of view."""
        shape = np.asarray(img.shape[:3])
        corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                            for k in (0, shape[2] - 1)], dtype=float)
        world = (img.affine @ corners.T)[:3].T
        lo, hi = world.min(0), world.max(0)
        div = self.config.divisor
        n = np.ceil((hi - lo) / self.res_mm).astype(int) + 1
        n = (np.ceil(n / div) * div).astype(int)
        centre = (lo + hi) / 2
        aff = np.diag([self.res_mm] * 3 + [1.0])
        aff[:3, 3] = centre - self.res_mm * (n - 1) / 2
        return tuple(int(v) for v in n), aff

    def template_grid(self, pose: np.ndarray, template: str = 'MNI152NLin2009aSym'
                      ) -> tuple[tuple[int, int, int], np.ndarray]:
        """The network grid over the template's field of view, carried into the image by
        ``pose`` (template world -> image world, rigid)."""
        from ..targets import template_file

        tpl = nib.load(str(template_file(template)))
        shape, aff = self.network_grid(tpl)
        return shape, pose @ aff

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, img: nib.spatialimages.SpatialImage, flip_tta: bool = True,
                keep_probabilities: bool = False, pose='auto',
                reference_mask: nib.spatialimages.SpatialImage | None = None,
                max_attempts: int = MAX_POSE_ATTEMPTS) -> LabelResult:
        """Label ``img`` and check the result (:mod:`.selfcheck`).

        ``pose='header'`` trusts the image's orientation (as SynthSeg does). ``pose='auto'``
        (default) labels at the header's orientation first and, when the labels fail an
        orientation check of the self-check (:data:`POSE_CHECKS`), finds the head's pose (:func:`~.orient.estimate_pose`: from
        ``reference_mask``, a brain mask of the image such as deepbet's, when given, else
        from the intensities) and labels again on a grid aligned with it, trying the
        searches' next candidates (:meth:`_pose_candidates`), up to ``max_attempts`` labellings
        (the header's included). The first labelling that
        passes is returned; if none does, the one with the fewest failed checks (then the
        highest ``intensity_fit``), with ``result.check['ok'] = False``. A 4x4 matrix (template world -> image world) labels
        at that pose, checked but without retries."""
        t0 = time.perf_counter()
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim > 3:
            data = data[..., 0]
        data = np.nan_to_num(data)
        zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
        dev = self.device
        vol = torch.as_tensor(data, device=dev)[None, None]
        # anti-aliasing: FWHM of the network's voxel, in native voxels
        sig = [0.42 * self.res_mm / z if self.res_mm > z * 1.2 else 0.0 for z in zooms]
        vol = gaussian_blur(vol, sig)
        ref = None
        if reference_mask is not None:
            ref = (np.asarray(reference_mask.dataobj) > 0).astype(np.float32)
            ref = (torch.as_tensor(ref, device=dev)[None, None], reference_mask.affine)
        timings = {'resample_s': 0.0, 'network_s': 0.0, 'pose_s': 0.0}

        def attempt(name: str, shape, net_aff) -> dict:
            ta = time.perf_counter()
            x = self._network_input(vol, img.affine, shape, net_aff)
            ref_grid = None
            if ref is not None:
                ref_grid = self._network_input(ref[0], ref[1], shape, net_aff, normalise=False)
                ref_grid = ref_grid[0, 0].cpu().numpy() > 0.5
            region = self._region(x, ref_grid)
            tb = time.perf_counter()
            probs = self._forward(x, region)
            if flip_tta:
                pf = self._forward(x.flip(2), None if region is None else region.flip(0)).flip(2)
                probs = 0.5 * (probs + pf[:, self.flip])
            tc = time.perf_counter()
            timings['resample_s'] += tb - ta
            timings['network_s'] += tc - tb
            grid_labels = np.asarray(self.labels, dtype=np.int16)[probs[0].argmax(0).cpu().numpy()]
            check = check_labels(grid_labels, (self.res_mm,) * 3, ref_grid, x[0, 0].cpu().numpy())
            return {'name': name, 'probs': probs, 'net_aff': net_aff, 'check': check,
                    'tiles': dict(self._last_tiles)}

        attempts: list[dict] = []
        pose_info: dict | None = None
        if isinstance(pose, np.ndarray):
            shape, net_aff = self.template_grid(np.asarray(pose, dtype=float))
            attempts.append(attempt('given', shape, net_aff))
        elif pose in ('header', 'auto'):
            shape, net_aff = self.network_grid(img)
            attempts.append(attempt('header', shape, net_aff))
            # only a failed orientation check says the pose is wrong; a failed volume,
            # connectivity or mask check on a right pose is the labels' quality, which a
            # searched pose does not fix (measured: a PD head whose header labels failed
            # 'connected' only, Dice 0.72, got Dice 0.05 from a pose 90 deg off that
            # passed every check)
            if pose == 'auto' and set(attempts[-1]['check'].failed) & POSE_CHECKS:
                pose_info = {}
                for name, matrix in self._pose_candidates(img, reference_mask, pose_info, timings):
                    if len(attempts) >= max_attempts:
                        break
                    if _rotation_deg(matrix) < self.MIN_POSE_CHANGE_DEG:
                        # the header's pose, give or take what training covers (rotations
                        # of +-20 deg): relabelling there cannot fix a wrong pose, and the
                        # search's error would only cost accuracy
                        pose_info.setdefault('skipped', []).append(name)
                        continue
                    shape, net_aff = self.template_grid(matrix)
                    attempts.append(attempt(name, shape, net_aff))
                    attempts[-1]['matrix'] = matrix
                    if attempts[-1]['check'].ok:
                        break
        else:
            raise ValueError(f"pose must be 'header', 'auto' or a 4x4 matrix, not {pose!r}")
        best = next((a for a in attempts if a['check'].ok), None)
        if best is None:  # fewest failed checks; among those, labels that fit the image best
            best = min(attempts, key=lambda a: (len(a['check'].failed),
                                                -a['check'].values.get('intensity_fit', 0.0)))
        if pose_info is not None and 'matrix' in best:
            pose_info['matrix'] = np.asarray(best['matrix']).round(6).tolist()
        elif pose_info is not None:  # the header's grid stays: say why
            errors = [v['error'] for v in pose_info.values() if isinstance(v, dict) and 'error' in v]
            pose_info['fallback'] = 'header'
            pose_info['reason'] = '; '.join(errors) or 'no searched pose passed the self-check better'
        t2 = time.perf_counter()
        probs, net_aff = best['probs'], best['net_aff']
        labels, mask = self._to_native(probs, net_aff, img)
        t3 = time.perf_counter()
        lab_img = nib.Nifti1Image(labels, img.affine)
        lab_img.header.set_data_dtype(np.int16)
        lab_img.set_qform(img.affine, 1)
        lab_img.set_sform(img.affine, 1)
        mask_img = nib.Nifti1Image(mask, img.affine)
        mask_img.header.set_data_dtype(np.uint8)
        mask_img.set_qform(img.affine, 1)
        mask_img.set_sform(img.affine, 1)
        check = {**best['check'].to_dict(), 'pose': best['name'],
                 'attempts': [{'pose': a['name'], 'ok': a['check'].ok, 'failed': a['check'].failed}
                              for a in attempts], 'tiles': best['tiles']}
        timings.update({'native_s': t3 - t2, 'total_s': t3 - t0})
        return LabelResult(labels=lab_img, mask=mask_img, timings=timings,
                           probabilities=probs[0].cpu().numpy() if keep_probabilities else None,
                           network_affine=net_aff, pose=pose_info, check=check)

    @staticmethod
    def _pose_candidates(img, reference_mask, info: dict, timings: dict):
        """Poses to try after the header's: the best candidate of the brain-mask search (with
        a reference mask), then the best of the intensity search, then the two searches'
        next candidates in turn (mask-search-2, intensity-search-2, ...). The searches'
        best candidates come before either's alternatives: on a real head rotated by 58
        degrees (the demo's third head, 2026-12-03) the mask search's three candidates all
        failed the self-check and the intensity search's first passed it with the right pose
        (label centroids 1.0 mm from the target's under a similarity), but it came fifth,
        after the limit of four labellings."""
        from itertools import zip_longest

        from .orient import estimate_pose

        searches = ([('mask', reference_mask)] if reference_mask is not None else []) + [('intensity', None)]
        later = []
        for kind, mask in searches:
            tp = time.perf_counter()
            try:
                found = estimate_pose(img, mask=mask)
            except ValueError as exc:  # e.g. an empty image
                info[f'{kind}_search'] = {'error': str(exc)}
                continue
            finally:
                timings['pose_s'] += time.perf_counter() - tp
            info[f'{kind}_search'] = {'score': round(found.score, 4),
                                      'header_score': round(found.identity_score, 4)}
            yield f'{kind}-search', found.matrix
            later.append([(f'{kind}-search-{k + 2}', alt)
                          for k, alt in enumerate(found.alternatives)])
        for group in zip_longest(*later):
            for item in group:
                if item is not None:
                    yield item

    def _network_input(self, vol: torch.Tensor, affine: np.ndarray, shape, net_aff,
                       normalise: bool = True) -> torch.Tensor:
        """``vol`` resampled onto the network grid (trilinear), then (``normalise``) scaled
        to [0, 1] between its minimum and its 99.5th percentile, clipped."""
        dev = self.device
        to_native = torch.as_tensor(np.linalg.inv(affine) @ net_aff, dtype=torch.float32, device=dev)
        grid = identity_grid(shape, dev)
        coords = torch.einsum('ab,bijk->aijk', to_native[:3, :3], grid) + to_native[:3, 3].view(3, 1, 1, 1)
        x = sample_field(vol, coords[None], mode='bilinear', padding_mode='zeros')
        if not normalise:
            return x
        lo = float(x.min())
        pos = x[x > lo]
        hi = float(torch.quantile(pos[torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(0))
                                      [:1_000_000].to(dev)], 0.995)) if pos.numel() else lo + 1
        return ((x - lo) / max(hi - lo, 1e-6)).clamp(0, 1)

    def _forward_tiles(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits = self.model(x)
        return logits.float().softmax(1)

    def _region(self, x: torch.Tensor, ref_grid: np.ndarray | None) -> torch.Tensor | None:
        """Where labels may be (network grid): within ``REGION_MARGIN_MM`` of the reference
        brain mask (deepbet's in a participant run) when one is given and its volume is that
        could be a brain's (:data:`REGION_MASK_CM3`); else everywhere (``None``). The upper
        bound is above the self-check's brain volume: a brain mask of a coarse image is
        inflated by its boundary voxels (measured: Colin27's 1737 cm^3 brain scaled by 1.066
        gave a deepbet mask of 2525 cm^3 at 3 mm, and with the earlier bound of 2500 the
        network labelled 75 % of that head's field of view as brain). The network was trained on
        crops around the brain: the neck and face of a large field of view (SynthSeg's
        256^3) are outside its training distribution and would otherwise get brain labels.
        (An Otsu head mask without a reference was tried and cut into the brain of a
        held-out T1 with skull: structure Dice 0.54 instead of 0.69.)"""
        from scipy import ndimage

        ref_cm3 = 0.0 if ref_grid is None else float(ref_grid.sum()) * self.res_mm ** 3 / 1000
        low, high = REGION_MASK_CM3
        if not low <= ref_cm3 <= high:  # no mask, or not a brain's (the mask is wrong)
            return None
        near = ndimage.binary_dilation(ref_grid, iterations=max(1, int(round(self.REGION_MARGIN_MM
                                                                              / self.res_mm))))
        return torch.as_tensor(near, device=x.device)

    def _forward(self, x: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (float32) of a normalised network-grid volume, predicted in
        tiles of the training crop size (:mod:`.inference`); outside ``region``, background."""
        probs, info = sliding_window_probabilities(self._forward_tiles, x, len(self.labels),
                                                   roi=self.tile, overlap=self.TILE_OVERLAP,
                                                   region=region)
        self._last_tiles = info
        return probs

    def _to_native(self, probs: torch.Tensor, net_aff: np.ndarray, img) -> tuple[np.ndarray, np.ndarray]:
        """Labels on the native grid.

        The probabilities are upsampled trilinearly, in the network's own frame, to about the
        native voxel size (slab by slab, to bound memory), the arg-max is taken there, and each
        native voxel takes the label of the nearest upsampled voxel (error at most half a
        native voxel)."""
        zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
        factor = int(np.clip(np.round(self.res_mm / zooms.min()), 1, 4))
        shape_net = probs.shape[2:]
        up_shape = [(n - 1) * factor + 1 for n in shape_net]
        fine = np.zeros(up_shape, dtype=np.uint8)
        slab = 8
        for start in range(0, shape_net[0] - 1, slab):
            stop = min(shape_net[0], start + slab + 1)
            chunk = probs[:, :, start:stop]
            size = [(stop - start - 1) * factor + 1, up_shape[1], up_shape[2]]
            up = F.interpolate(chunk, size=size, mode='trilinear', align_corners=True)
            fine[start * factor:start * factor + size[0]] = up.argmax(1)[0].to(torch.uint8).cpu().numpy()
        fine_aff = net_aff.copy()
        fine_aff[:3, :3] = net_aff[:3, :3] / factor
        # nearest fine voxel of every native voxel, a slab of native slices at a time
        to_fine = torch.as_tensor(np.linalg.inv(fine_aff) @ img.affine, dtype=torch.float64)
        shape = img.shape[:3]
        fine_t = torch.from_numpy(fine)
        lut = torch.as_tensor(self.labels, dtype=torch.int16)
        bound = torch.as_tensor(up_shape).view(3, 1)
        jk = torch.stack(torch.meshgrid(torch.arange(shape[1]), torch.arange(shape[2]), indexing='ij')
                         ).reshape(2, -1).to(torch.float64)
        base = to_fine[:3, 1:3] @ jk + to_fine[:3, 3:4]  # [3, J*K]
        labels = np.zeros(shape, dtype=np.int16)
        step = max(1, 4_000_000 // max(1, jk.shape[1]))
        for start in range(0, shape[0], step):
            ii = torch.arange(start, min(shape[0], start + step), dtype=torch.float64)
            pts = base[:, None, :] + to_fine[:3, 0].view(3, 1, 1) * ii.view(1, -1, 1)
            idx = torch.round(pts).to(torch.int64).reshape(3, -1)
            ok = ((idx >= 0) & (idx < bound)).all(0)
            vals = torch.zeros(idx.shape[1], dtype=torch.int16)
            vals[ok] = lut[fine_t[idx[0, ok], idx[1, ok], idx[2, ok]].long()]
            labels[start:start + len(ii)] = vals.reshape(len(ii), shape[1], shape[2]).numpy()
        head = labels > 0
        if head.any():
            head = largest_component_filled(head)
        labels[~head] = 0
        return labels, brain_mask_from_labels(labels, zooms).astype(np.uint8)


def label_image(img: nib.spatialimages.SpatialImage, weights: str | Path | None = None,
                device: str = 'cpu', flip_tta: bool = True, pose: str = 'header') -> LabelResult:
    """Label one image with the (cached) network (``pose``: see :meth:`LabelNetwork.predict`)."""
    return LabelNetwork.cached(weights, device).predict(img, flip_tta=flip_tta, pose=pose)
