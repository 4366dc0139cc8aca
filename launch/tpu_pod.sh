#!/usr/bin/env bash
# launch/tpu_pod.sh CMD [ARGS...]
#
# Runs CMD on every worker of a Cloud TPU VM pod slice at once (gcloud ... ssh --worker=all).
# Each worker gets MEDJAX_DISTRIBUTED=auto, so medjax.parallel.multihost lets JAX read the pod
# layout (coordinator, process count, this worker's id) from the TPU VM metadata.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#       python -m medjax.train --exp mrm_retina --data /data/ukb --workdir /mnt/runs/mrm
#
# The code, the data and the workdir must be reachable at the same paths on every worker (e.g. a
# GCS FUSE mount or an NFS share for --workdir: Orbax writes one checkpoint from all workers).
#
# Variables:
#   TPU_NAME     the TPU VM (pod slice) name (required)
#   ZONE         its zone (required)
#   PROJECT      the Google Cloud project (default: gcloud's configured project)
#   REMOTE_DIR   directory on each worker to run in (default: medjax, relative to the home directory)
#   SETUP        shell command run on each worker first, e.g. 'git pull && pip install -e .'
#   SSH_FLAGS    extra flags for `gcloud compute tpus tpu-vm ssh` (e.g. --internal-ip)
#   DRY_RUN=1    print the gcloud command instead of running it
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM pod slice name}"
: "${ZONE:?set ZONE to the zone of the TPU}"

remote="cd $(printf '%q' "${REMOTE_DIR:-medjax}")"
[[ -n ${SETUP:-} ]] && remote+=" && $SETUP"
remote+=" && MEDJAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 $(printf '%q ' "$@")"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all)
[[ -n ${PROJECT:-} ]] && cmd+=("--project=$PROJECT")
# shellcheck disable=SC2206
[[ -n ${SSH_FLAGS:-} ]] && cmd+=($SSH_FLAGS)
cmd+=("--command=$remote")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
