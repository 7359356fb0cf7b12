#!/usr/bin/env bash
# Runs the main job on every worker of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo_dir=~/jaxdistill] \
#       [--env="KEY=V KEY2=V2"] [--dry_run] -- MAIN_ARGS...
#   launch/tpu_pod.sh --tpu=v5p-128-a --zone=us-east5-a -- \
#       --config=configs/qwen2_5_32b_s1.py --workdir=/mnt/shared/runs/s1
#
# The same command starts on all workers through `gcloud compute tpus tpu-vm ssh --worker=all`;
# JAX finds its peers by itself on TPU. The checkout (with `pip install -e ".[tpu]"` done) must
# exist at --repo_dir on every worker, and --workdir must be a directory every worker sees
# (e.g. a gcsfuse or Filestore mount). --dry_run prints the gcloud command.
set -euo pipefail
tpu=""; zone=""; project=""; repo_dir="~/jaxdistill"; extra_env=""; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}"; shift ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --project=*) project="${1#*=}"; shift ;;
    --repo_dir=*) repo_dir="${1#*=}"; shift ;;
    --env=*) extra_env="${1#*=}"; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main-job arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" || $# -eq 0 ]]; then
  echo "usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] -- MAIN_ARGS..." >&2; exit 2
fi
main_args=$(printf '%q ' "$@")
remote="cd $repo_dir && ${extra_env:+env $extra_env }python3 -m jaxdistill.main $main_args"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=$remote")
[[ -n "$project" ]] && cmd+=("--project=$project")
if [[ $dry_run -eq 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
