#!/usr/bin/env bash
# Install everything (first run) and run the embedded demo: the shipped teacher distils into a
# student with another tokenizer, on CPU when there is no GPU. Extra arguments are recipe
# overrides (key=value). Two ranks on CPU, one per GPU where there are GPUs.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" requirements.txt
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec deepspeed launch/distill.py "$@"
else
  exec deepspeed --num_gpus 2 launch/distill.py "$@"
fi
