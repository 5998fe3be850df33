# Shared by the recipes (source it after parse_options.sh), in the way of Kaldi's cmd.sh: how
# each stage's command is launched. --cmd is a prefix put in front of every lalmtool command
# (segment, pool, score, report); --gpu_cmd (default: --cmd) in front of those that use the
# accelerator (extract, finetune, decode). No scheduler of our own: the cluster's launcher runs
# the same command line that would run here.
#   --cmd local                                   run here (default)
#   --cmd "srun -p cpu -c 4" --gpu_cmd "srun -p gpu --gres=gpu:1 -c 8 --mem=64G"
#   --gpu_cmd "../utils/sbatch.sh -p gpu --gres=gpu:1 --time=24:00:00"   (a batch job, waited for)
case "${cmd:-local}" in
  local|"") cpu_cmd="" ;;
  *) cpu_cmd=$cmd ;;
esac
case "${gpu_cmd:-}" in
  "") gpu_cmd=$cpu_cmd ;;
  local) gpu_cmd="" ;;
esac
