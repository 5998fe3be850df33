#!/usr/bin/env bash
# sbatch.sh [SBATCH OPTIONS...] COMMAND [ARGS...]: runs COMMAND as a Slurm batch job and waits
# for it (sbatch --wait), so that a recipe stage can use it as its launcher (--gpu_cmd); the
# job's output goes to slurm-<jobid>.out unless the options say otherwise, and its exit status
# becomes this script's. Options are those before the first word that does not start with "-"
# (give option values as --opt=value).
set -euo pipefail
opts=()
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do opts+=("$1"); shift; done
[ $# -gt 0 ] || { echo "usage: sbatch.sh [SBATCH OPTIONS] COMMAND [ARGS...]" >&2; exit 1; }
exec sbatch --wait "${opts[@]}" --chdir="$PWD" --export=ALL --wrap="$(printf '%q ' "$@")"
