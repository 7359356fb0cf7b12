#!/usr/bin/env bash
# Runs the main job as N JAX processes on this machine, talking over 127.0.0.1.
#
#   launch/local.sh [-n N] [--cpu_devices K] [--port P] [--script S] [--dry_run] -- ARGS...
#   launch/local.sh -n 2 -- --config=configs/tiny.py --workdir=runs/tiny2
#   launch/local.sh -n 2 --script tools/generate.py -- --init=DIR --prompts=P --output=O
#
#   -n N             processes (default 2)
#   --cpu_devices K  on CPU, simulated devices per process (sets XLA_FLAGS; default: unset)
#   --port P         coordinator port (default: a free one)
#   --script S       run this Python script instead of the main job (tools/generate.py)
#   --dry_run        print the commands instead of running them
# Process 0 logs to the terminal, process i > 0 to /tmp/jaxdistill-<port>-<i>.log.
# Ctrl-C / SIGTERM are forwarded to every process (each checkpoints and exits).
set -euo pipefail
n=2; cpu_devices=""; port=""; dry_run=0; program=(-m jaxdistill.main)
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    --cpu_devices) cpu_devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --script) program=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (main-job arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "give the main job's arguments after --" >&2; exit 2; fi
python=${PYTHON:-python3}
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
env_prefix=()
if [[ -n "$cpu_devices" ]]; then
  env_prefix=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices" JAX_PLATFORMS=cpu)
fi
pids=()
for ((i = 0; i < n; i++)); do
  cmd=("${env_prefix[@]}" "$python" "${program[@]}" "$@" "--coordinator_address=127.0.0.1:$port"
       "--num_processes=$n" "--process_id=$i")
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "/tmp/jaxdistill-$port-$i.log" 2>&1 &
  fi
  pids+=($!)
done
[[ $dry_run -eq 1 ]] && exit 0
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
