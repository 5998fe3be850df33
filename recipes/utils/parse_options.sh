# Shared by the recipes (source it after setting the defaults): --name VALUE sets the recipe's
# variable "name" (dashes read as underscores: --stop-stage = --stop_stage; --name=VALUE works
# too), as Kaldi/ESPnet's parse_options.sh does; an option the recipe has no variable for is an
# error. --help prints the recipe's header comment.
# --config FILE (as in Kaldi/ESPnet) first reads options from FILE, one per line, as
# "name=value" or "--name value" ('#' starts a comment; quotes around the value are removed);
# options on the command line win over the file, wherever --config stands. A recipe that has
# a variable of its own named "config" takes --config as that variable instead.

_po_set() {  # _po_set OPTION VALUE WHERE
  local name=${1#--}; name=${name//-/_}
  if [[ ! "$name" =~ ^[a-z][a-z0-9_]*$ ]] || [ -z "${!name+set}" ]; then
    echo "unknown option --${1#--}$3 (see --help)" >&2; exit 1
  fi
  printf -v "$name" '%s' "$2"
}

_po_config() {  # reads one options file
  local file=$1 line n=0 key value
  [ -f "$file" ] || { echo "--config: file not found: $file" >&2; exit 1; }
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%%#*}; line=$(echo "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    [ -z "$line" ] && continue
    if [[ "$line" =~ ^(--)?([A-Za-z][A-Za-z0-9_-]*)(=|[[:space:]]+)(.*)$ ]]; then
      key=${BASH_REMATCH[2]}; value=${BASH_REMATCH[4]}
      value=${value#\"}; value=${value%\"}; value=${value#\'}; value=${value%\'}
      _po_set "$key" "$value" " in $file line $n"
    else
      echo "$file line $n: expected name=value or --name value, not: $line" >&2; exit 1
    fi
  done < "$file"
}

if [ -z "${config+set}" ]; then  # --config FILE: an options file, read before the command line
  _po_args=("$@")
  for ((_po_i = 0; _po_i < ${#_po_args[@]}; _po_i++)); do
    case "${_po_args[_po_i]}" in
      --config=*) _po_config "${_po_args[_po_i]#--config=}" ;;
      --config)
        [ $((_po_i + 1)) -lt ${#_po_args[@]} ] || { echo "option --config needs a value" >&2; exit 1; }
        _po_config "${_po_args[_po_i + 1]}"; _po_i=$((_po_i + 1)) ;;
    esac
  done
  unset _po_args _po_i
fi

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help)  # the recipes cd into their own folder first: find the script from there too
      _po_self=$0; [ -r "$_po_self" ] || _po_self=$(basename "$0")
      awk 'NR > 1 { if (/^#/) print; else exit }' "$_po_self"; exit 0 ;;
    --config|--config=*)
      if [ -z "${config+set}" ]; then
        [ "$1" = --config ] && shift; shift; continue
      fi
      if [ "$1" = --config ]; then
        [ $# -ge 2 ] || { echo "option $1 needs a value" >&2; exit 1; }
        config=$2; shift 2
      else
        config=${1#--config=}; shift
      fi ;;
    --*=*) _po_set "${1%%=*}" "${1#*=}" ""; shift ;;
    --*)
      [ $# -ge 2 ] || { echo "option $1 needs a value" >&2; exit 1; }
      _po_set "$1" "$2" ""; shift 2 ;;
    *) echo "unknown argument $1 (options are --name value; see --help)" >&2; exit 1 ;;
  esac
done
unset _po_self
