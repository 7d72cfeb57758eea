#!/usr/bin/env bash
# A/B on the device machine: one command in a baseline tree and in this tree, alternately.
#   git archive <commit> | tar -x -C .base && echo <commit> > .base/.commit     (here; .base/ is ignored)
#   bash bench/ab.sh ROUNDS 'python3 bench/host_profile.py --device cuda --passes-only'
# The command sees AB_LABEL (base or new), e.g. to name its output folder.
# Each tree is built as its pyproject.toml says (`pip install --target`, no dependencies, nothing
# linked: the package-dir mapping of kernels/ is what the build does) into its own folder, which goes
# first on PYTHONPATH; the command runs from the tree's root (where `python3 -c` and `-m` import the
# tree's own workbench/ source, and the built kernels). Both trees then run the same way on the same
# machine within one call: bench/NOTES.md compares only numbers taken that way.
set -uo pipefail
rounds=$1; shift
here=$(pwd)
[ -d "$here/.base" ] || { echo "ab.sh: no .base/ tree" >&2; exit 2; }
for tree in "$here/.base" "$here"; do
  site="/tmp/ab-site-$([ "$tree" = "$here" ] && echo new || echo base)"
  rm -rf "$site"
  python3 -m pip install -q --no-deps --no-build-isolation --target "$site" "$tree" >/tmp/ab-pip.log 2>&1 \
    || { tail -20 /tmp/ab-pip.log; exit 1; }
  # A baseline from before kernels/ became `workbench_kernels` (its kernels/ has an __init__.py) imports
  # it as workbench.kernels: copy it there, as its build did, so that its source runs too (python3 -c).
  if [ -f "$tree/kernels/__init__.py" ] && [ ! -e "$tree/workbench/kernels" ]; then
    cp -r "$tree/kernels" "$tree/workbench/kernels"
  fi
  [ -d "$tree/.cache" ] || cp -r "$here/.cache" "$tree/.cache"
done
for round in $(seq "$rounds"); do
  for tree in "$here/.base" "$here"; do
    label=$([ "$tree" = "$here" ] && echo new || echo base)
    echo "=== round $round: $label $(cat "$tree/.commit" 2>/dev/null)"
    (cd "$tree" && AB_LABEL=$label PYTHONPATH="/tmp/ab-site-$label" bash -c "$*")
  done
done
