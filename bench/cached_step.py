"""Where a cached step's time goes, against the ideal's cached step (the Fn+Bn-only model, compiled).

Every row caches at every step after the first (a threshold no diff reaches, no limit on cached
steps in a row, or an all-cache static mask), so each call is a cached step; the rows are called in
turn, one call each per round, so that every call finds the caches as a step of bench/e2e.py finds
them (the other rows' weights in between), and each row's time is its median:

- `Fn+Bn only`: the ideal's cached step;
- `dittofx device decision`: the torch.cond graph (prologue, Fn, diff, cond, Bn, epilogue), as
  dynamic thresholds run; `... graph alone` is that graph compiled and called directly, with the
  pre-hook's inputs of one call, so the difference is the pre-hook and the forward around the graph;
- `dittofx host-decided cache step`: a static mask's cache graph (no diff, no cond), and alone;
- `dittofx split_at_decision={}`: the head compiled alike in the pre-hook, then the cache tail (a
  copy of the head's outputs); `... head alone`: that head compiled and called directly: the
  torch.cond graph with the cache branch inline in place of the cond (diff, gates and all), so
  against `dittofx device decision, graph alone` it prices the cond itself;
- `pre-hook`: dittofx's forward pre-hook alone, on the device-decision model;
- `dynamo guard check`: the guard check of the compiled forward's frame alone, for the torch.cond
  graph and for the cache graph (each weight the graph takes is a guarded input).

    python bench/cached_step.py --device cpu --out bench/results/cached_step_cpu_<date>.json
    python bench/cached_step.py --device cpu --size-asserts 0 ...   # inductor's input size asserts off

On CUDA each call is followed by a synchronize, so a row's time is its host and device time.
"""

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.utils._pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

import dittofx  # noqa: E402
from dittofx.runtime.engine import HEAD_KWARG  # noqa: E402

STEPS = 1024  # one request for the whole run (a mask's longest): every call after the first is a cached step
ALWAYS = {"residual_diff_threshold": 1e9, "max_warmup_steps": 1, "Fn_compute_blocks": e2e.FN, "Bn_compute_blocks": e2e.BN, "num_inference_steps": STEPS}
DEVICE_DECIDES = {**ALWAYS, "max_continuous_cached_steps": -1}
STATIC_CACHE = {**ALWAYS, "steps_computation_mask": [1] + [0] * (STEPS - 1), "steps_computation_policy": "static"}


def graph_alone(model: torch.nn.Module, call_kwargs: dict):
    """The graph the model's next call runs, compiled on its own and called on that call's inputs."""
    engine = model._dittofx
    engine._pre_hook(model, (), call_kwargs)
    graph, _, leading = engine.current
    inputs = pytree.tree_leaves(((), engine.in_signature_order(call_kwargs)))
    compiled = torch.compile(graph, fullgraph=True)
    return lambda: compiled(*leading, *inputs)


def head_alone(model: torch.nn.Module, call_kwargs: dict):
    """The split head of the model's next call, compiled on its own and called on that call's inputs."""
    engine = model._dittofx
    engine._pre_hook(model, (), call_kwargs)
    _, entry, _ = engine.current
    leading = entry.leading("split-head", engine.states[engine._branch()].tensors())
    inputs = pytree.tree_leaves(((), engine.in_signature_order(call_kwargs)))
    compiled = torch.compile(entry.graphs["split-head"], fullgraph=True)
    return lambda: compiled(*leading, *inputs)


def guard_check(model: torch.nn.Module, call_kwargs: dict):
    """Dynamo's guard check of the compiled forward's frame, alone, for the graph the model's next
    call runs (the cache entry whose guards pass on that call's frame)."""
    engine = model._dittofx
    engine._pre_hook(model, (), call_kwargs)
    f_locals = {"self": model, "args": (), "kwargs": {**engine.in_signature_order(call_kwargs), HEAD_KWARG: ()}}
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(model.forward.__code__)  # its own: e2e.compiled_alone
    check = next(e.guard_manager.check for e in entries if e.guard_manager.check(f_locals))
    return lambda: check(f_locals)


def rows(spec: e2e.Spec, device: str, dtype: torch.dtype) -> dict:
    full = spec.build(device, dtype)
    latents, conditioning = spec.request_inputs(device, dtype)
    kwargs = dict(hidden_states=latents, timestep=torch.full((1,), 500.0, device=device, dtype=dtype), return_dict=False, **conditioning)
    optimized = {name: dittofx.optimize(e2e.sharing_weights(full), cfg, **opts) for name, cfg, opts in (
        ("device", DEVICE_DECIDES, {}), ("host", STATIC_CACHE, {}), ("split", DEVICE_DECIDES, {"split_at_decision": {}}),
        ("pre-hook", DEVICE_DECIDES, {}))}  # fmt: skip
    compiled = {name: e2e.compiled_alone(m, fullgraph=True) for name, m in optimized.items()}
    fn_bn = e2e.compiled_alone(spec.build(device, dtype, **spec.fn_bn_layers), fullgraph=True)
    with torch.no_grad():
        for run in (fn_bn, *compiled.values()):
            for _ in range(3):  # the first call computes, the next are cached steps
                run(**kwargs)
        made = {
            "Fn+Bn only": lambda: fn_bn(**kwargs),
            "dittofx device decision": lambda: compiled["device"](**kwargs),
            "dittofx device decision, graph alone": graph_alone(optimized["device"], kwargs),
            "dittofx host-decided cache step": lambda: compiled["host"](**kwargs),
            "dittofx host-decided cache step, graph alone": graph_alone(optimized["host"], kwargs),
            "dittofx split_at_decision={}": lambda: compiled["split"](**kwargs),
            "dittofx split_at_decision={}, head alone": head_alone(optimized["split"], kwargs),
            "pre-hook (device decision model)": lambda: optimized["pre-hook"]._dittofx._pre_hook(optimized["pre-hook"], (), kwargs),
            "dynamo guard check (device decision)": guard_check(optimized["device"], kwargs),
            "dynamo guard check (host-decided cache step)": guard_check(optimized["host"], kwargs),
        }
    return made, optimized


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, choices=sorted(e2e.SPECS), help="default: pixart on CUDA, wan-cpu on CPU")
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--size-asserts", type=int, choices=(0, 1), default=1, help="inductor's size_asserts (its input size/stride checks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if 2 * args.rounds + 8 > STEPS:  # a model serves two rows (called, and its graph alone); set-up calls are steps too
        ap.error(f"--rounds {args.rounds}: at most {(STEPS - 8) // 2} (one request of {STEPS} steps, two calls a round)")
    torch.set_num_threads(args.threads)
    torch._inductor.config.size_asserts = bool(args.size_asserts)
    cpu = args.device == "cpu"
    model_name = args.model or ("wan-cpu" if cpu else "pixart")
    made, optimized = rows(e2e.SPECS[model_name], args.device, torch.float32 if cpu else torch.bfloat16)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    times: dict[str, list[float]] = {name: [] for name in made}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, call in made.items():
                sync()
                start = time.perf_counter()
                call()
                sync()
                times[name].append(time.perf_counter() - start)
    stats = {name: dittofx.summary(m, log_table=False)[0] for name, m in optimized.items() if name != "pre-hook"}
    if not all(s.cached_steps and s.computed_steps in ([], [0]) for s in stats.values()):
        raise SystemExit(f"a row computed a step after its first: { {n: s.computed_steps for n, s in stats.items()} }")
    ideal = statistics.median(times["Fn+Bn only"])
    table = [{"row": name, "median_us": statistics.median(t) * 1e6, "vs_ideal": statistics.median(t) / ideal,
              "over_ideal_us": (statistics.median(t) - ideal) * 1e6} for name, t in times.items()]  # fmt: skip
    for part in table[-3:]:  # the pre-hook and the guard checks alone are parts, not steps
        part["vs_ideal"] = part["over_ideal_us"] = None
    print(f"{'row':48s} {'median us':>10s} {'vs ideal':>9s} {'over ideal us':>14s}")
    for r in table:
        print(f"{r['row']:48s} {r['median_us']:10.1f} " + ("" if r["vs_ideal"] is None else f"{r['vs_ideal']:9.3f} {r['over_ideal_us']:14.1f}"))
    result = {
        "date": date.today().isoformat(), "device": args.device, "torch": torch.__version__, "model": model_name,
        "threads": args.threads, "size_asserts": bool(args.size_asserts), "rounds": args.rounds,
        "command": "python " + " ".join(sys.argv), "rows": table,
        # the tensors before the call's inputs that each row's graph was given (split: its tail's)
        "leading_inputs": {name: sum(x is not None for x in m._dittofx.current[2]) for name, m in optimized.items() if name != "pre-hook"},
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
