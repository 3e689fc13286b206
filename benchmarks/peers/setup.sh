#!/usr/bin/env bash
# Creates the peer frameworks' virtualenvs OUTSIDE the repo, for benchmarks only (they are never tunelab dependencies):
#   $TUNELAB_PEERS/llamafactory   LLaMA-Factory 0.9.5 (pins transformers <= 5.6, so it needs its own venv)
#   $TUNELAB_PEERS/trl            TRL 1.16 with its dependencies
# Both get the CPU build of torch==2.13.0 (a constraints file keeps pip from replacing it with another build).
# Usage: bash benchmarks/peers/setup.sh [llamafactory] [trl]     (default: both; an existing venv is kept)
set -euo pipefail
PEERS=${TUNELAB_PEERS:-$HOME/.cache/tunelab-peers}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LLAMAFACTORY_VERSION=${LLAMAFACTORY_VERSION:-0.9.5}
TRL_VERSION=${TRL_VERSION:-1.16.0}
WHICH=("$@")
[ ${#WHICH[@]} -eq 0 ] && WHICH=(llamafactory trl)
mkdir -p "$PEERS"

pip_in() {  # $1: venv; the rest: pip arguments. Hides pip's notes about local index folders lacking a package.
  local venv=$1; shift
  "$venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

make_venv() {  # $1: folder; installs pip and the CPU torch into it
  local venv=$1
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  pip_in "$venv" install -q --upgrade pip
  printf 'torch==%s\n' "$TORCH_VERSION" > "$venv/constraints.txt"
  # The CPU build: from a local wheel where one is configured, else from PyTorch's CPU index.
  pip_in "$venv" install -q "torch==$TORCH_VERSION" 2>/dev/null \
    || pip_in "$venv" install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
}

setup_llamafactory() {
  local venv=$PEERS/llamafactory
  if [ -f "$venv/.ready" ]; then echo "llamafactory: $venv exists"; return; fi
  echo "llamafactory: creating $venv (LLaMA-Factory $LLAMAFACTORY_VERSION)"
  make_venv "$venv"
  pip_in "$venv" install -q -c "$venv/constraints.txt" "llamafactory==$LLAMAFACTORY_VERSION"
  # LLaMA-Factory pulls torchvision and torchaudio, built for other torch versions than the pinned CPU one.
  # torchvision is not needed for text models, so it goes; torchaudio is imported unconditionally by LLaMA-Factory,
  # so it stays, minus its native library (unused for text, and it does not load against this torch).
  pip_in "$venv" uninstall -q -y torchvision || true
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site"/torchaudio/lib/_torchaudio*.so  # _torchaudio.abi3.so or _torchaudio.so, by torchaudio version
  "$venv/bin/python" -c 'import llamafactory, transformers, torch; print("llamafactory", llamafactory.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
  touch "$venv/.ready"
}

setup_trl() {
  local venv=$PEERS/trl
  if [ -f "$venv/.ready" ]; then echo "trl: $venv exists"; return; fi
  echo "trl: creating $venv (TRL $TRL_VERSION)"
  make_venv "$venv"
  pip_in "$venv" install -q -c "$venv/constraints.txt" "trl==$TRL_VERSION" peft accelerate datasets
  "$venv/bin/python" -c 'import trl, transformers, peft, torch; print("trl", trl.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "torch", torch.__version__)'
  touch "$venv/.ready"
}

for name in "${WHICH[@]}"; do
  case $name in
    llamafactory) setup_llamafactory ;;
    trl) setup_trl ;;
    *) echo "unknown peer: $name (llamafactory, trl)" >&2; exit 2 ;;
  esac
done
