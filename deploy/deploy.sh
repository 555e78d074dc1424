#!/usr/bin/env bash
# Create the work pools from deploy/work-pools/*.json and register every deployment of
# deploy/prefect.yaml. Idempotent: pools are overwritten with the templates, deployments updated.
#
#   PREFECT_API_URL=http://server:4200/api deploy/deploy.sh            # gpu-pool as a process pool
#   GPU_POOL_TYPE=docker deploy/deploy.sh                               # or docker / kubernetes
#
# gpu-pool: deploy/work-pools/{process,docker,kubernetes-gpu}.json; cpu-pool: process-cpu.json.
# SYNTH_OOD_CODE_DIR is where a flow run finds this project: the checkout this script runs in for
# a process pool, /opt/synth-ood (the worker image, deploy/Dockerfile.gpu) for docker / kubernetes.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-prefect}
GPU_POOL_TYPE=${GPU_POOL_TYPE:-process}

case "$GPU_POOL_TYPE" in
  process)    template=deploy/work-pools/process.json;        code_dir=$PWD ;;
  docker)     template=deploy/work-pools/docker.json;         code_dir=/opt/synth-ood ;;
  kubernetes) template=deploy/work-pools/kubernetes-gpu.json; code_dir=/opt/synth-ood ;;
  *) echo "deploy.sh: GPU_POOL_TYPE must be process, docker or kubernetes (got '$GPU_POOL_TYPE')" >&2; exit 2 ;;
esac
export SYNTH_OOD_CODE_DIR=${SYNTH_OOD_CODE_DIR:-$code_dir}
# the deployments' default output roots (a run or a schedule may still pass its own `out`): shared
# storage for the GPU deployments, a folder of this checkout for the tiny ones (never a shared /tmp)
export SYNTH_OOD_OUT=${SYNTH_OOD_OUT:-s3://synth-ood}
export SYNTH_OOD_LOCAL_OUT=${SYNTH_OOD_LOCAL_OUT:-$PWD/runs/deployed}

if [ -z "${PREFECT_API_URL:-}" ]; then
  echo "deploy.sh: set PREFECT_API_URL to your Prefect server (e.g. http://127.0.0.1:4200/api)" >&2
  exit 2
fi

"$PREFECT" --no-prompt work-pool create gpu-pool --type "$GPU_POOL_TYPE" --base-job-template "$template" --overwrite
"$PREFECT" --no-prompt work-pool create cpu-pool --type process --base-job-template deploy/work-pools/process-cpu.json --overwrite
"$PREFECT" --no-prompt deploy --prefect-file deploy/prefect.yaml --all
echo "deploy.sh: pools gpu-pool ($GPU_POOL_TYPE) and cpu-pool ready; flow runs start in $SYNTH_OOD_CODE_DIR;"\
     "default outputs under $SYNTH_OOD_OUT (imagenet, food101) and $SYNTH_OOD_LOCAL_OUT (tiny)"
