#!/usr/bin/env bash
# Submits the main job to a SLURM GPU cluster: one process per node, all GPUs of the node.
#
#   launch/slurm.sh --nodes=N [--gpus_per_node=8] [--partition=P] [--time=HH:MM:SS] \
#       [--job_name=jaxdistill] [--dry_run] -- MAIN_ARGS...
#   launch/slurm.sh --nodes=8 -- --config=configs/qwen2_5_7b_sft.py --workdir=/shared/runs/q7b
#
# jax.distributed discovers the coordinator, process count and index from SLURM's variables,
# so every task runs the identical command. Run from the checkout on a shared filesystem;
# --workdir must be shared too. --dry_run prints the batch script instead of submitting it.
set -euo pipefail
nodes=""; gpus=8; partition=""; time_limit="24:00:00"; job_name="jaxdistill"; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}"; shift ;;
    --gpus_per_node=*) gpus="${1#*=}"; shift ;;
    --partition=*) partition="${1#*=}"; shift ;;
    --time=*) time_limit="${1#*=}"; shift ;;
    --job_name=*) job_name="${1#*=}"; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main-job arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$nodes" || $# -eq 0 ]]; then
  echo "usage: launch/slurm.sh --nodes=N [--gpus_per_node=G] -- MAIN_ARGS..." >&2; exit 2
fi
main_args=$(printf '%q ' "$@")
script="#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
${partition:+#SBATCH --partition=$partition
}#SBATCH --output=%x-%j.out
# SIGTERM 120 s before the time limit: each process checkpoints and exits 0.
#SBATCH --signal=TERM@120
cd $(pwd)
srun python3 -m jaxdistill.main $main_args"
if [[ $dry_run -eq 1 ]]; then echo "$script"; exit 0; fi
echo "$script" | sbatch
