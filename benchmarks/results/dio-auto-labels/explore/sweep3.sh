#!/bin/bash
while pgrep -f "sweep[12].sh" > /dev/null; do sleep 10; done
L0='"representations": ["diffeo"], "label_weight": 0'
NAME=f_lw0_sv15 SV=1.5 DIOP="{\"dio\": {$L0}}" bash run.sh
NAME=f_lw0_sg2 SG=2 DIOP="{\"dio\": {$L0}}" bash run.sh
echo SWEEP3DONE
