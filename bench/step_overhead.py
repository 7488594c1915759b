"""The ideal's two parts (the baseline step and the Fn+Bn-only step) in a process without e2e's other
rows: per-step time as bench/e2e.py measures it (CUDA events between calls; includes the host's
launch and guard work when the host is the bottleneck), default and reduce-overhead, against the
same compiled step replayed from one manually captured CUDA graph (device time only). Each compiled
module gets a forward code object of its own, as in bench/e2e.py (`compiled_alone`).

    python bench/step_overhead.py --out $OUT/step_overhead.json     # CUDA; PixArt-512 shape
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402
from dittofx.runtime.graphs import record  # noqa: E402


def per_step_ms(model, spec, latents, inputs, repeats: int = 5) -> float:
    clock = e2e.Clock("cuda")
    e2e.denoise(model, spec, latents, inputs, clock)
    return statistics.median(statistics.median(e2e.denoise(model, spec, latents, inputs, clock)[1]) for _ in range(repeats)) * 1e3


def replay_ms(model, spec, latents, inputs, replays: int = 50) -> float:
    """One step captured into a torch.cuda.CUDAGraph, replayed back to back: device time per step."""
    t = torch.full((1,), 500.0, device="cuda", dtype=latents.dtype)
    call = lambda: model(hidden_states=latents, timestep=t, return_dict=False, **inputs)[0]  # noqa: E731
    graph, _ = record(call, call, pool=None)
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pixart", choices=sorted(e2e.SPECS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    spec, dtype = e2e.SPECS[args.model], torch.bfloat16
    latents, inputs = spec.request_inputs("cuda", dtype)
    rows = []
    with torch.no_grad():
        models = {"Fn+Bn only": spec.build("cuda", dtype, **spec.fn_bn_layers), "baseline": spec.build("cuda", dtype)}
        for name, weights in models.items():
            default = e2e.compiled_alone(e2e.sharing_weights(weights), fullgraph=True)
            began = time.perf_counter()
            row = {"model": name, "events_default_ms": per_step_ms(default, spec, latents, inputs)}
            try:
                row["graph_replay_ms"] = replay_ms(default, spec, latents, inputs)
            except RuntimeError as err:  # a capture inductor's code does not allow: recorded, not hidden
                row["graph_replay_ms"], row["replay_error"] = float("nan"), str(err).splitlines()[0]
            ro = e2e.compiled_alone(e2e.sharing_weights(weights), fullgraph=True, mode="reduce-overhead")
            row["events_reduce_overhead_ms"] = per_step_ms(ro, spec, latents, inputs)
            row["seconds"] = time.perf_counter() - began
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "model": args.model, "command": "python " + " ".join(sys.argv)}  # fmt: skip
    print("| step | events, default (ms) | events, reduce-overhead (ms) | one CUDA graph replayed (ms) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['events_default_ms']:.3f} | {r['events_reduce_overhead_ms']:.3f} | {r['graph_replay_ms']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
