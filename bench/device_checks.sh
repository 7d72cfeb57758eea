#!/usr/bin/env bash
# The GPU checks in one device call (bench/NOTES.md's summary has what each figure is today):
# compiled kernel tests, the engine's GPU tests, the kernel bandwidth benchmark and the host
# profile of workload (a); `tests` runs the kernel and GPU tests side by side; `a`, `b`, `c` run
# bench/gpu_vs_transformers.py on one workload (ours sync and overlapped twice; (a) also overlapped
# with decode runs of 1 and 8 steps beside the default 4, and transformers' best generate_batch row;
# (c) overlapped only). Everything lands in $OUT (or ./device_out): at most 8 files.
#   bash bench/device_checks.sh [kernels] [gpu] [tests] [tests3] [ab] [kbench] [profile] [a] [b] [c]
#   (ab: needs .base/, see bench/ab.sh, AB_WORKLOADS="a c" AB_ROUNDS=2 to change what it runs;
#    tests3: the GPU tests three times in a row)
#   (default: kernels gpu kbench profile)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 1; }
steps=${*:-kernels gpu kbench profile}
echo "local commit $(git log -1 --format=%h 2>/dev/null)" >"$OUT/commit.txt"
{ date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
for step in $steps; do
  case $step in
    kernels) timeout 300 python3 -m pytest -o addopts="" tests/test_kernels.py -q -n 4 -p no:cacheprovider -rs --durations=5 >"$OUT/kernel_tests.txt" 2>&1 ;;
    tests) (timeout 280 python3 -m pytest -o addopts="" tests/test_kernels.py -q -n 4 -p no:cacheprovider -rs \
              >"$OUT/kernel_tests.txt" 2>&1; echo "exit $?" >>"$OUT/kernel_tests.txt") &
           timeout 280 python3 -m pytest -o addopts="" tests/test_gpu.py tests/test_batch_invariance.py -v \
             -p no:cacheprovider -rs --durations=8 >"$OUT/gpu_tests.txt" 2>&1; echo "exit $?" >>"$OUT/gpu_tests.txt"; wait ;;
    tests3) for i in 1 2 3; do  # issue 21: the GPU tests green three runs in a row
              timeout 190 python3 -m pytest -o addopts="" tests/test_gpu.py tests/test_batch_invariance.py -q \
                -p no:cacheprovider -rs >"$OUT/gpu_tests_run$i.txt" 2>&1; echo "exit $?" >>"$OUT/gpu_tests_run$i.txt"
            done ;;
    ab) # AB_WORKLOADS (default a) here against the commit in .base/ (bench/ab.sh), this tree's benchmark
        # script for both trees, AB_ROUNDS rounds (default 3)
        timeout 560 bash bench/ab.sh "${AB_ROUNDS:-3}" "python3 $PWD/bench/gpu_vs_transformers.py \
          --workloads ${AB_WORKLOADS:-a} --rows ours-overlap --repeats 1 --timeout 160 --out /tmp/ab_\$AB_LABEL" \
          >"$OUT/ab.txt" 2>&1 ;;
    a) timeout 420 python3 bench/gpu_vs_transformers.py --workloads a --rows ours-overlap ours-overlap-k1 \
         ours-overlap-k8 ours-sync hf-batch-graphs --repeats 2 --hf-repeats 1 --timeout 75 --out "$OUT" ;;
    b) timeout 400 python3 bench/gpu_vs_transformers.py --workloads b --rows ours-overlap ours-sync --repeats 2 \
         --timeout 95 --out "$OUT" ;;
    c) timeout 330 python3 bench/gpu_vs_transformers.py --workloads c --rows ours-overlap --repeats "${C_REPEATS:-1}" \
         --timeout 160 --out "$OUT" ;;
    gpu) timeout 300 python3 -m pytest -o addopts="" tests/test_gpu.py -v -p no:cacheprovider -rs --durations=5 >"$OUT/gpu_tests.txt" 2>&1 ;;
    kbench) timeout 240 python3 bench/kernel_bench.py --out-dir "$OUT" >"$OUT/kernel_bench.log" 2>&1 ;;
    profile) { timeout 150 python3 bench/host_profile.py --device cuda --freeze-gc off --passes-only
               echo "--- engine default (freeze_gc on for CUDA) ---"
               timeout 300 python3 bench/host_profile.py --device cuda --top 40; } >"$OUT/host_profile.txt" 2>&1 ;;
  esac
  echo "$step exit $?" >>"$OUT/env.txt"
done
tail -n 3 "$OUT"/*.txt; grep -h -E "^\| ours|^\| hf|Bandwidth" "$OUT"/*.md 2>/dev/null
