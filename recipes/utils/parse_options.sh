# Shared by the recipes (source it after setting the defaults): --name VALUE sets the recipe's
# variable "name" (dashes read as underscores: --stop-stage = --stop_stage), as Kaldi/ESPnet's
# parse_options.sh does; an option the recipe has no variable for is an error. --help prints the
# recipe's header comment.
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) awk 'NR > 1 { if (/^#/) print; else exit }' "$0"; exit 0 ;;
    --*)
      name=${1#--}; name=${name//-/_}
      if [[ ! "$name" =~ ^[a-z][a-z0-9_]*$ ]] || [ -z "${!name+set}" ]; then
        echo "unknown option $1 (see --help)" >&2; exit 1
      fi
      [ $# -ge 2 ] || { echo "option $1 needs a value" >&2; exit 1; }
      printf -v "$name" '%s' "$2"; shift 2 ;;
    *) echo "unknown argument $1 (options are --name value; see --help)" >&2; exit 1 ;;
  esac
done
unset name
