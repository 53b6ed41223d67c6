#!/usr/bin/env bash
# Install everything (first run) and run the embedded demo: the shipped teacher distils into a
# student with another tokenizer, on CPU when there is no GPU.
#
#   bash scripts/demo.sh [PROGRAM ARGS]                     e.g. train.max_steps=20 --fresh
#   bash scripts/demo.sh [LAUNCHER ARGS] -- [PROGRAM ARGS]  e.g. --num_gpus 1 -- train.max_steps=20
#
# PROGRAM ARGS go to launch/distill.py: recipe overrides key=value, --config, --fresh,
# --print-recipe, --help (lists every recipe key). LAUNCHER ARGS, before a `--`, go to the
# deepspeed launcher (--num_gpus, --include, --master_port, ...). Without a `--` every argument
# goes to launch/distill.py.
# Ranks: one per GPU where there are GPUs, two on CPU, unless LAUNCHER ARGS say (--num_gpus,
# --include, --exclude).
# Rendezvous port: a free one picked here, unless LAUNCHER ARGS give --master_port (DeepSpeed's
# fixed default, 29500, fails with EADDRINUSE while another DeepSpeed job runs on the machine).
# Ctrl-C (or SIGTERM / SIGHUP to this script): the run saves a checkpoint at its next step and
# exits 0 (the same command resumes it); a second Ctrl-C kills it at once, without saving. The
# launcher runs in its own session (setsid) and this script asks the ranks to stop through a stop
# file (BLD_STOP_FILE): the terminal's SIGINT would otherwise reach the DeepSpeed runner, which
# dies on it, and its launcher, which answers with SIGTERM to the ranks and exit code 1.
# BLD_DEMO_DRY_RUN=1 prints the launch command instead of running it (and installs nothing).
set -euo pipefail
if [[ -n "${BLD_DEMO_DRY_RUN:-}" ]]; then
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
else
  source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" requirements.txt
fi

launcher=() program=() separated=0
for arg in "$@"; do
  if (( ! separated )) && [[ "$arg" == "--" ]]; then separated=1; continue; fi
  if (( separated )); then program+=("$arg"); else launcher+=("$arg"); fi
done
if (( ! separated )); then
  program=(${launcher[@]+"${launcher[@]}"}) launcher=()
fi

# True when one of the options $2... (as `--name value` or `--name=value`) is among $1's words.
has_option() {
  local -n words=$1
  local word name
  shift
  for word in ${words[@]+"${words[@]}"}; do
    for name in "$@"; do
      [[ "$word" == "$name" || "$word" == "$name="* ]] && return 0
    done
  done
  return 1
}

LAUNCHER_ONLY=(--num_gpus --num_accelerators --include --exclude --master_port --master_addr
               --num_nodes --hostfile --launcher)
if (( ! separated )) && has_option program "${LAUNCHER_ONLY[@]}"; then
  echo "scripts/demo.sh: launcher arguments go before a '--', program arguments after it, e.g." >&2
  echo "  bash scripts/demo.sh --num_gpus 1 -- train.max_steps=20" >&2
  exit 2
fi
if ! has_option launcher --master_port; then
  # Bound and released at once: the launcher binds it a moment later.
  launcher+=(--master_port "$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')")
fi
if ! has_option launcher --num_gpus --num_accelerators --include --exclude -i -e \
   && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  launcher=(--num_gpus 2 "${launcher[@]}")
fi

command=(deepspeed "${launcher[@]}" launch/distill.py ${program[@]+"${program[@]}"})
if [[ -n "${BLD_DEMO_DRY_RUN:-}" ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
if ! command -v setsid >/dev/null 2>&1; then
  exec "${command[@]}"  # no setsid (not Linux): Ctrl-C goes to every process, as DeepSpeed handles it
fi

stop_dir="$(mktemp -d)"
export BLD_STOP_FILE="$stop_dir/stop"
interrupts=0
on_signal() {
  interrupts=$((interrupts + 1))
  if (( interrupts == 1 )); then
    echo "scripts/demo.sh: stopping: the run saves a checkpoint at its next step, then exits" \
         "(Ctrl-C again to kill it without saving)" >&2
    touch "$BLD_STOP_FILE"
  else
    echo "scripts/demo.sh: killing the run (its last complete checkpoint stays)" >&2
    kill -KILL -- "-$run_pid" 2>/dev/null || true
  fi
}
trap on_signal INT TERM HUP
# Not a process group leader (no job control in a script), so setsid execs in place: $! is the
# runner's pid and its new session's process group id.
setsid "${command[@]}" &
run_pid=$!
# A trapped signal interrupts `wait` while the run goes on: wait until it has really ended, then
# once more for its status (bash keeps the status of a finished background process).
while kill -0 "$run_pid" 2>/dev/null; do
  wait "$run_pid" || true
done
status=0
wait "$run_pid" || status=$?
rm -rf "$stop_dir"
exit "$status"
