"""Validation of the shipped DIO weights as the trainer validates (held-out cross-contrast
pairs through register_arrays), with and without the image term: the step-0 baseline of
the cpu-2mm-prompted fine-tune."""
import json, sys, torch
from dataclasses import replace
from keyprep.pipeline.dio.train import RECIPES, DioTrainer, init_from_weights
from keyprep.pipeline.synth.train import HELD_OUT, load_training_maps
torch.set_num_threads(1)
train, held = load_training_maps('/work/shared/data/synthseg/training_label_maps')
train = train[:2]
for w in (4.0, 0.0):
    cfg = replace(RECIPES['cpu-2mm-prompted'], image_weight=w)
    t = DioTrainer(train, cfg, held_out=held)
    init_from_weights(t.model, 'shipped')
    print(w, json.dumps(t.evaluate()), flush=True)
