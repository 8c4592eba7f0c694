#!/bin/bash
# The drivers of this folder (and run_thick.sh) are ../../dio-image-prompt/explore/{hook.py,run.sh,run_syn.sh},
# copied to /tmp/exp; the hook gained PC (prompt_channels) for run_thick.sh.
L0='"representations": ["diffeo"], "label_weight": 0'
NAME=f_lw0 DIOP="{\"dio\": {$L0}}" bash run.sh
NAME=f_lw0_sv05 SV=0.5 DIOP="{\"dio\": {$L0}}" bash run.sh
NAME=f_lw0_sg05 SG=0.5 DIOP="{\"dio\": {$L0}}" bash run.sh
NAME=f_lw0_mu16 DIOP="{\"dio\": {$L0, \"image_weight\": 16}}" bash run.sh
NAME=f_lw0_w7 DIOP="{\"dio\": {$L0, \"image_window\": 7}}" bash run.sh
NAME=f_lw0_it SV=1 ITERS=400,200,100 DIOP="{\"dio\": {$L0}}" bash run.sh
echo SWEEPDONE
