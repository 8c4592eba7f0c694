#!/bin/bash
while [ -z "$(grep SWEEP4DONE sweep4.out)" ]; do sleep 5; done
D='"representations": ["diffeo"]'
NAME=s_sg3 SG=3 DIOP="{\"dio\": {$D}}" bash run_syn.sh
NAME=f_sg4 SG=4 DIOP="{\"dio\": {$D}}" bash run.sh
echo SWEEP5DONE
