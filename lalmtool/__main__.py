"""``python -m lalmtool``: the command line, run by a given interpreter (the recipes call
``"$python" -m lalmtool``, see recipes/utils/stages.sh, so no ``lalmtool`` on PATH is needed)."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="lalmtool")
