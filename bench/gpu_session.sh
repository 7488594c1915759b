#!/usr/bin/env bash
# Issue 7's GPU runs, in device calls that each end inside the device tool's 10-minute limit.
#
# Here, once (pip reaches the registry here, not there):  bash ../shared/gpu/wheels.sh
# Then each call, from the repository root there, with carry [".whl"] and timeout_s 600:
#     bash bench/gpu_session.sh 1          # a call by number (table below), or steps by name:
#     bash bench/gpu_session.sh pixart-dynamic kernels
# Every step writes $OUT/<step>.json (+ .md beside it for e2e steps); $OUT/call.log holds all
# output, with each row's warm-up seconds (mostly compile). A step starts only when the call has
# its estimated seconds left before that signal: a minute before the call's time is up it gets SIGTERM. bench/e2e.py
# then reports the rounds that finished (cut in the first round: the rows timed once; cut while warming up: the rows that warmed up, timed
# in one round), so the call always returns what it measured. The PixArt, kernel and step-overhead estimates are the times logged on
# the H100 on 2026-11-23 (plus a margin), and so are flux1024-{fast,ultra}-default (339 and 397 s); the other FLUX ones are estimates (bench/README.md).
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back (the device tool sets it)}"
(($#)) || { echo "usage: bash bench/gpu_session.sh CALL|STEP..." >&2; exit 2; }
budget=${BUDGET_S:-570} # seconds for this call: the device tool stops a command at 600
log=$OUT/call.log

# step -> "estimated seconds | command arguments"; FLUX rows hold one 22 GiB bf16 weight set.
# pytest steps: `-o addopts=-ra` drops pyproject's `-n 2` (the GPU image has no pytest-xdist)
# FLUX: cache-dit's compiled row is its regional compile only (issue 7's FLUX anchor; a full compile
# of FLUX costs minutes of a call's ten); one FLUX step per call
declare -A STEP=(
    [kernels]="115 | bench/kernels.py --sweep --reduce-config auto --rotate-l2 8"
    [step-overhead]="100 | bench/step_overhead.py"
    [export-cuda]="100 | -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_export.py"
    [own-graphs-cuda]="100 | -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_own_graphs.py"
    [pixart-static]="280 | bench/e2e.py --model pixart --only static --repeats 7"
    [pixart-dynamic]="450 | bench/e2e.py --model pixart --only dynamic --variants cuda_graphs --repeats 5"
    [split-gap]="150 | bench/split_gap.py"
    [pixart-dynamic-sge]="320 | bench/e2e.py --model pixart --only dynamic --repeats 5 --skip-guard-eval"
    [flux1024-fast-default]="450 | bench/e2e.py --model flux-1024 --only fast --modes default --repeats 3 --cachedit regional"
    [flux1024-ultra-default]="450 | bench/e2e.py --model flux-1024 --only ultra --modes default --repeats 3 --cachedit regional"
    [flux1024-fast-ro]="450 | bench/e2e.py --model flux-1024 --only fast --modes reduce-overhead --repeats 3 --cachedit regional"
    [flux1024-ultra-ro]="450 | bench/e2e.py --model flux-1024 --only ultra --modes reduce-overhead --repeats 3 --cachedit regional"
    [flux512-fast-default]="450 | bench/e2e.py --model flux-512 --only fast --modes default --repeats 3 --cachedit regional"
    [flux512-ultra-default]="450 | bench/e2e.py --model flux-512 --only ultra --modes default --repeats 3 --cachedit regional"
    [flux512-fast-ro]="450 | bench/e2e.py --model flux-512 --only fast --modes reduce-overhead --repeats 3 --cachedit regional"
    [flux512-ultra-ro]="450 | bench/e2e.py --model flux-512 --only ultra --modes reduce-overhead --repeats 3 --cachedit regional"
    [flux1024-dynamic-default]="420 | bench/e2e.py --model flux-1024 --only dynamic --modes default --repeats 3 --cachedit regional"
    [flux1024-dynamic-ro]="420 | bench/e2e.py --model flux-1024 --only dynamic --modes reduce-overhead --repeats 3 --cachedit regional"
    [flux512-dynamic-default]="380 | bench/e2e.py --model flux-512 --only dynamic --modes default --repeats 3 --cachedit regional"
    [flux512-dynamic-ro]="380 | bench/e2e.py --model flux-512 --only dynamic --modes reduce-overhead --repeats 3 --cachedit regional"
)
# the calls, in the order of what issue 7's acceptance needs first
CALLS=(
    ""
    "pixart-dynamic own-graphs-cuda"
    "export-cuda pixart-dynamic-sge"
    "pixart-static step-overhead"
    "split-gap kernels"
    "flux1024-fast-default"
    "flux1024-ultra-default"
    "flux1024-fast-ro"
    "flux1024-ultra-ro"
    "flux512-fast-default"
    "flux512-ultra-default"
    "flux512-fast-ro"
    "flux512-ultra-ro"
    "flux1024-dynamic-default"
    "flux1024-dynamic-ro"
    "flux512-dynamic-default"
    "flux512-dynamic-ro"
)

steps=()
for arg; do
    if [[ $arg =~ ^[0-9]+$ ]]; then
        ((arg >= 1 && arg < ${#CALLS[@]})) || { echo "no call $arg" >&2; exit 2; }
        read -ra more <<<"${CALLS[arg]}"
        steps+=("${more[@]}")
    elif [[ -v STEP[$arg] ]]; then
        steps+=("$arg")
    else
        echo "no step $arg; steps: $(printf '%s\n' "${!STEP[@]}" | sort | xargs)" >&2
        exit 2
    fi
done

# the install line ../shared/gpu/wheels.sh prints (diffusers, cache-dit, torchao, carried in .whl/)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
# steps (and calls, while the machine stays warm) share compiled graphs: an ignored folder is kept
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor-gpu
export TRITON_INTERPRET=0 DITTOFX_TEST_DEVICE=cuda # test steps: compiled Triton; test_export builds on the GPU

nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee -a "$log"
python3 -c "import torch; from dittofx.runtime.graphs import conditional_nodes as c; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'conditional nodes:', c())" | tee -a "$log"
for name in "${steps[@]}"; do
    estimate=${STEP[$name]%% |*}
    read -ra cmd <<<"${STEP[$name]#*| }"
    left=$((budget - SECONDS))
    if ((left - 60 < estimate || left <= 90)); then # the step gets SIGTERM 60 s before the call's end
        echo "== $name: skipped, ${left} s left, estimated ${estimate} s" | tee -a "$log"
        continue
    fi
    echo "== $name: starts at ${SECONDS} s, estimated ${estimate} s, SIGTERM after $((left - 60)) s" | tee -a "$log"
    [[ ${cmd[0]} == *.py ]] && cmd+=(--out "$OUT/$name.json") # bench scripts write JSON; test steps log only
    timeout -k 60 "$((left - 60))" python3 "${cmd[@]}" 2>&1 | tee -a "$log" | grep -v '\[Cache-DiT\]'
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS} s of the call" | tee -a "$log"
done
grep -h '^==' "$log"
