"""The trainer's validation of recipe ``cpu-deployed`` with and without the engine's contrast
transfer (``val_contrast_transfer``, added at step 950 of this run), for weights files or
training checkpoints given on the command line:

    .venv/bin/python training/carl-deployed/val_contrast_transfer.py /tmp/carl-former.pt \\
        keyprep/models/carl/keyprep-carl.pt training/carl-deployed/checkpoint.pt

(``/tmp/carl-former.pt``: ``git show bd226fb~1:keyprep/models/carl/keyprep-carl.pt``, the
weights shipped before step 575.) Prints one JSON line per file and setting: mean Dice and
the per-pair Dice of the three held-out pairs (the same pairs as ``val_log.tsv``)."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from keyprep.pipeline.carl.network import load_carl
from keyprep.pipeline.carl.train import RECIPES, CarlTrainConfig, Trainer
from keyprep.pipeline.synth.train import load_training_maps

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
train_maps, held = load_training_maps(ROOT.parent / 'shared/data/synthseg/training_label_maps')
for path in sys.argv[1:]:
    blob = torch.load(path, map_location='cpu', weights_only=True)
    for transfer in (False, True):
        cfg = replace(RECIPES['cpu-deployed'], val_contrast_transfer=transfer)
        t = Trainer(train_maps[:1], cfg, held_out=held)
        if 'model' in blob:  # a training checkpoint
            t.model.load_state_dict(blob['model'])
            step = blob['step']
        else:
            t.model = load_carl(path)[0].float()
            step = blob['step']
        t.model.eval()
        r = t.evaluate()
        print(json.dumps({'file': path, 'step': step, 'val_contrast_transfer': transfer,
                          'dice': round(r['dice'], 4), 'fold_pct': round(r['fold_pct'], 4),
                          'per_pair': r['per_pair']}), flush=True)
