"""Where a step split at its decision loses time on the GPU: a torch.profiler trace of one request
of the PixArt-512 dynamic config (F1B0 W4 MC3 R0.24) run with split_at_decision and the head under
reduce-overhead, beside the compiled baseline under reduce-overhead (issue 7 item 3).

Per step of the split row: the host time from the decision's read (the D2H copy that `bool(head[0])`
waits on) to the launch of the tail's CUDA graph, and the GPU's idle time from that copy's end to
the next kernel (the tail's first, when the tail runs as a CUDA graph); for both rows: the request's
GPU busy time (kernels and copies, merged) and idle time. The trace is written beside the JSON
(gzip) for a closer look. The profiler adds host time (0.2 ms a step on the H100): its figures
are upper bounds.

    python bench/split_gap.py --out $OUT/split_gap.json       # CUDA; bench/gpu_session.sh split-gap
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

import dittofx  # noqa: E402

CONFIG = "dynamic F1B0 W4 MC3 R0.24"
STACK_STEPS = range(8, 13)  # split steps past the warm-up: computed ones and, at R0.24 on 2026-11-23, step 11 cached


def request(model, spec, latents, inputs, stacks: profile | None = None) -> float:
    """One 28-step request with a profiler range per step; its CUDA-event time in seconds. With
    `stacks` (a profiler with Python stacks, which slow the host several times), steps STACK_STEPS
    run under it."""
    x = latents
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(e2e.STEPS):
        if stacks is not None and i == STACK_STEPS.start:
            stacks.start()
        if stacks is not None and i == STACK_STEPS.stop:
            stacks.stop()
        with record_function(f"step {i}"):
            t = torch.full((1,), spec.timestep_scale * (1 - i / e2e.STEPS), device=x.device, dtype=x.dtype)
            v = model(hidden_states=x, timestep=t, return_dict=False, **inputs)[0]
            x = x - v[:, : x.shape[1]] / e2e.STEPS
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def analyse(trace: dict) -> dict:
    """GPU busy/idle over the request; per decision read (a device-to-host copy, then the host's wait
    for it): host µs from the wait's return to the next cudaGraphLaunch, GPU µs from the copy's end
    to the next kernel."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("step "))
    inside = [(a, b) for a, b, _ in gpu if a >= steps[0][0]]
    span = max(b for _, b in inside) - min(a for a, _ in inside)
    gpu_busy = busy(inside)
    runtime = sorted((e["ts"], e["ts"] + e["dur"], e) for e in events if e.get("cat") == "cuda_runtime")
    copies = {g["args"].get("correlation"): b for a, b, g in gpu if g.get("cat") == "gpu_memcpy" and "DtoH" in g["name"]}
    gaps = []
    for ts, end, call in runtime:
        copy_end = copies.get(call.get("args", {}).get("correlation"))
        if ts < steps[0][0] or copy_end is None:
            continue
        waited = max([end] + [e for t, e, c in runtime if t >= ts and t <= end + 50 and "Synchronize" in c["name"]])
        launch = next((t for t, _, c in runtime if t > waited and c["name"] == "cudaGraphLaunch"), None)
        kernel = next((a for a, _, g in gpu if a >= copy_end and g.get("cat") == "kernel"), None)
        if launch is not None and kernel is not None:
            gaps.append({"host_us": launch - waited, "gpu_idle_us": kernel - copy_end})
    median = lambda key: statistics.median(g[key] for g in gaps) if gaps else None  # noqa: E731
    return {
        "gpu_busy_ms": gpu_busy / 1e3, "gpu_span_ms": span / 1e3, "gpu_idle_ms": (span - gpu_busy) / 1e3,
        "decision_reads": len(gaps), "read_to_launch_host_us_median": median("host_us"),
        "read_to_kernel_gpu_idle_us_median": median("gpu_idle_us"), "reads": gaps,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec, dtype = e2e.SPECS["pixart"], torch.bfloat16
    latents, inputs = spec.request_inputs("cuda", dtype)
    cfg = dict(e2e.CONFIGS[CONFIG][0], Fn_compute_blocks=e2e.FN, Bn_compute_blocks=e2e.BN, num_inference_steps=e2e.STEPS)
    out = Path(args.out)
    rows = []
    with torch.no_grad():
        weights = spec.build("cuda", dtype)
        split = dittofx.optimize(e2e.sharing_weights(weights), cfg, split_at_decision={"mode": "reduce-overhead"})
        models = {
            "baseline compiled (reduce-overhead)": e2e.compiled_alone(e2e.sharing_weights(weights), mode="reduce-overhead", fullgraph=True),
            "dittofx split, head reduce-overhead": e2e.compiled_alone(split, mode="reduce-overhead", fullgraph=True),
        }  # fmt: skip
        for name, model in models.items():
            began = time.perf_counter()
            for _ in range(3):  # compile, record the CUDA graphs, then one more
                request(model, spec, latents, inputs)
            unprofiled = statistics.median(request(model, spec, latents, inputs) for _ in range(3))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                profiled = request(model, spec, latents, inputs)
            path = out.with_name(f"{out.stem}_{'split' if 'split' in name else 'baseline'}_trace.json")
            prof.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
            with gzip.open(f"{path}.gz", "wt") as f:
                json.dump(trace, f)
            path.unlink()
            if "split" in name:  # where the host's time goes, Python function by function (trace only)
                stacks = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
                request(model, spec, latents, inputs, stacks)
                stacks.export_chrome_trace(str(path))
                with gzip.open(str(path).replace("_trace.json", "_stacks_trace.json.gz"), "wt") as f:
                    f.write(path.read_text())
                path.unlink()
            row = {"row": name, "request_ms": unprofiled * 1e3, "profiled_request_ms": profiled * 1e3, **analyse(trace), "seconds": time.perf_counter() - began}
            if "split" in name:
                row["cached_steps"] = dittofx.summary(split, log_table=False)[0].cached_steps
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "reads"}), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": CONFIG,
            "command": "python " + " ".join(sys.argv)}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
