#!/usr/bin/env bash
# A/B on the device machine: one command in a baseline tree and in this tree, alternately.
#   git archive <commit> | tar -x -C .base && echo <commit> > .base/.commit     (here; .base/ is ignored)
#   bash bench/ab.sh ROUNDS 'python3 bench/host_profile.py --device cuda --passes-only'
# The command sees AB_LABEL (base or new), e.g. to name its output folder.
# Each tree runs from its own folder with itself on PYTHONPATH (workbench.kernels linked in,
# nothing installed), so both see the same machine within one call: bench/NOTES.md compares
# only numbers taken that way.
set -uo pipefail
rounds=$1; shift
here=$(pwd)
[ -d "$here/.base" ] || { echo "ab.sh: no .base/ tree" >&2; exit 2; }
for tree in "$here/.base" "$here"; do
  ln -sfn ../kernels "$tree/workbench/kernels"
  [ -d "$tree/.cache" ] || cp -r "$here/.cache" "$tree/.cache"
done
for round in $(seq "$rounds"); do
  for tree in "$here/.base" "$here"; do
    label=$([ "$tree" = "$here" ] && echo new || echo base)
    echo "=== round $round: $label $(cat "$tree/.commit" 2>/dev/null)"
    (cd "$tree" && AB_LABEL=$label PYTHONPATH="$tree" bash -c "$*")
  done
done
