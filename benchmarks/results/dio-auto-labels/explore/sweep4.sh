#!/bin/bash
D='"representations": ["diffeo"]'
NAME=f_sg3 SG=3 DIOP="{\"dio\": {$D}}" bash run.sh
NAME=s_sg2 SG=2 DIOP="{\"dio\": {$D}}" bash run_syn.sh
NAME=s_sg1 DIOP="{\"dio\": {$D}}" bash run_syn.sh
echo SWEEP4DONE
