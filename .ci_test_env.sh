# Source this file to activate the environment built by .ci_build.sh.
_evo2_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
source "${_evo2_root}/.venv/bin/activate"
export PYTHONUNBUFFERED=1
unset _evo2_root
