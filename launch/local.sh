#!/usr/bin/env bash
# launch/local.sh N CMD [ARGS...]
#
# Starts N processes of CMD on this machine as one multi-process JAX run: process I gets
#   MEDJAX_COORDINATOR=127.0.0.1:PORT  MEDJAX_NUM_PROCESSES=N  MEDJAX_PROCESS_ID=I
# (read by medjax.parallel.multihost), JAX_PLATFORMS=cpu and its own CPU device(s); the CPU
# collectives between the processes go through gloo. Every output line is prefixed with "[I] ".
# When a process fails, the others are stopped and the script exits with the failed status; when
# all succeed it exits 0. SIGINT/SIGTERM to the script are passed on to every process (the trainer
# then saves a checkpoint and exits).
#
#   launch/local.sh 2 python -m medjax.train --exp mrm_retina --variant tiny --workdir runs/two
#
# Variables:
#   DRY_RUN=1                 print each process's environment and command, start nothing
#   MEDJAX_COORDINATOR_PORT   coordinator port on 127.0.0.1 (default: a free port, reserved for this
#                             run until it ends, so that concurrent runs never share one)
#   LOCAL_DEVICES             CPU devices per process (default 1)
#   MEDJAX_HEARTBEAT_TIMEOUT  seconds without a heartbeat before JAX declares a process dead and ends
#                             the run (default 60 here: this script itself stops the others as soon as
#                             one exits, and on a busy machine a live process can be starved for seconds)
#   MEDJAX_INIT_TIMEOUT       seconds for all N processes to start and join (default 300)
#   STOP_GRACE                seconds the other processes get after SIGTERM before SIGKILL (default 10)
#   PYTHON                    interpreter used to reserve a free port (default python3)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
N=$1
shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N must be a positive integer, got '$N'" >&2; exit 2; }
DEVICES=${LOCAL_DEVICES:-1}
[[ $DEVICES =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: LOCAL_DEVICES must be a positive integer, got '$DEVICES'" >&2; exit 2; }
GRACE=${STOP_GRACE:-10}
HEARTBEAT=${MEDJAX_HEARTBEAT_TIMEOUT:-60}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

reserve_port() {  # PORT=a free port, held by medjax/parallel/ports.py (not a job of ours) until we exit
  local file tries
  file=$(mktemp)
  ( "${PYTHON:-python3}" "$HERE/../medjax/parallel/ports.py" --while-alive $$ >"$file" 2>&1 </dev/null & )
  for ((tries = 0; tries < 600; tries++)); do  # up to 60 s: a loaded machine starts Python slowly
    [[ $(wc -l <"$file") -ge 1 ]] && break  # the port, or the error, as whole lines
    sleep 0.1
  done
  PORT=$(<"$file")
  rm -f "$file"
  [[ $PORT =~ ^[0-9]+$ ]] || { echo "local.sh: could not reserve a coordinator port: $PORT" >&2; exit 2; }
}
if [[ -n ${MEDJAX_COORDINATOR_PORT:-} ]]; then
  PORT=$MEDJAX_COORDINATOR_PORT
else
  reserve_port
fi

# The caller's other XLA flags are kept (without spaces inside a flag); the device count is ours.
XLA_FLAGS_OUT=--xla_force_host_platform_device_count=$DEVICES
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || XLA_FLAGS_OUT+=" $flag"
done

process_env() {  # PROCESS_ENV=(NAME=VALUE ...): the environment of process $1
  PROCESS_ENV=(JAX_PLATFORMS=cpu "XLA_FLAGS=$XLA_FLAGS_OUT"
    "MEDJAX_COORDINATOR=127.0.0.1:$PORT" "MEDJAX_NUM_PROCESSES=$N" "MEDJAX_PROCESS_ID=$1"
    "MEDJAX_HEARTBEAT_TIMEOUT=$HEARTBEAT" PYTHONUNBUFFERED=1)
}

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for ((i = 0; i < N; i++)); do
    process_env "$i"
    echo "[$i] env $(printf '%q ' "${PROCESS_ENV[@]}" "$@")"
  done
  exit 0
fi

STATUS_DIR=$(mktemp -d)
PIDS=()
cleanup() { rm -rf "$STATUS_DIR"; }
trap cleanup EXIT

# Each process runs in its own process group (set -m), so it can be stopped with everything it
# started; its output goes through a prefixer that ignores SIGINT/SIGTERM so that the process's
# last words (e.g. "saving a checkpoint") are still printed.
set -m
for ((i = 0; i < N; i++)); do
  (
    set +e
    trap ':' INT TERM
    process_env "$i"
    env "${PROCESS_ENV[@]}" "$@" 2>&1 | (
      trap '' INT TERM
      while IFS= read -r line || [[ -n $line ]]; do printf '[%s] %s\n' "$i" "$line"; done
    )
    echo "${PIPESTATUS[0]}" > "$STATUS_DIR/$i"
  ) &
  PIDS+=("$!")
done
set +m

signal_all() {  # signal_all SIG: send SIG to every process group still running
  for pid in "${PIDS[@]}"; do kill "-$1" -- "-$pid" 2>/dev/null || true; done
}

stop_all() {  # SIGTERM, then SIGKILL after $GRACE seconds
  signal_all TERM
  local deadline=$((SECONDS + GRACE))
  while ((SECONDS < deadline)) && [[ -n $(jobs -rp) ]]; do sleep 0.2; done
  signal_all KILL
  wait 2>/dev/null || true
}

on_signal() {  # on_signal NAME STATUS
  echo "local.sh: got SIG$1, passing it on to the $N processes" >&2
  signal_all "$1"
  wait 2>/dev/null || true
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

while :; do
  running=0
  for ((i = 0; i < N; i++)); do
    if [[ -f $STATUS_DIR/$i ]]; then
      rc=$(<"$STATUS_DIR/$i")
      if [[ $rc != 0 ]]; then
        echo "local.sh: process $i exited with status $rc; stopping the others" >&2
        stop_all
        exit "$rc"
      fi
    elif kill -0 "${PIDS[$i]}" 2>/dev/null; then
      running=$((running + 1))
    else  # gone without a status: killed from outside
      [[ -f $STATUS_DIR/$i ]] && continue
      echo "local.sh: process $i was killed; stopping the others" >&2
      stop_all
      exit 137
    fi
  done
  ((running == 0)) && break
  sleep 0.2
done
wait
echo "local.sh: all $N processes finished" >&2
