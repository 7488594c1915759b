"""Would CUDA graphs of dittofx's own close the dynamic gap? A prototype measured beside the rows
it would replace (issue 7 item 3; PixArt-512, dynamic F1B0 W4 MC3 R0.24).

`bench/split_gap.py` found that a step split at its decision leaves the GPU idle ~375 µs while the
host gets from the decision's read to the tail's launch: dynamo's guard check of the compiled
forward, cudagraph trees' input checks and the runtime wrappers. Here the model is not compiled by
the user. Each of dittofx's graphs (compute, cache, the split head and both tails) is compiled with
inductor's default mode and captured once into a torch.cuda.CUDAGraph, then replayed from the
engine's own Python path. The pre-hook and the forward still run, but no dynamo frame or cudagraph
tree does. Rows, in one run: the compiled baseline and Fn+Bn-only step under reduce-overhead (the
ideal), dittofx split with the head under reduce-overhead (today's best), and the prototype.

The prototype assumes what a real one would have to check: the state, weights and constants keep
their addresses (they do within a request in this loop); the graph's outputs are consumed before
its next replay (the Euler update does); one CFG branch and one size.

    python bench/own_graphs.py --out $OUT/own_graphs.json                # CUDA
    python bench/own_graphs.py --device cpu --model pixart-tiny --repeats 2   # the plumbing, no graphs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

import dittofx  # noqa: E402

CONFIG = "dynamic F1B0 W4 MC3 R0.24"


class GraphReplay:
    """`fn(*args)` compiled by inductor (default mode) and, on CUDA, replayed from one CUDA graph:
    the first `fixed` arguments keep their addresses; the others are copied into the graph's own
    input tensors unless they are those tensors: an input that is another replay's output (a tail's
    head tensors, the same objects at every call) is taken as it is. The warm-up runs that precede
    the capture mutate the state: `state` is saved and restored around them, and its addresses are
    checked at every call (a new state, at new sizes or on a new branch, would need a new capture;
    the weights are assumed to stay put). Outputs are the graph's own tensors, overwritten by its
    next replay."""

    outputs_of_replays: dict[int, torch.Tensor] = {}  # id -> every GraphReplay's output tensors

    def __init__(self, fn: Any, fixed: int, state: list[torch.Tensor]):
        self.fn, self.fixed, self.state = torch.compile(fn, fullgraph=True), fixed, state
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list = []
        self.outputs: Any = None
        self.state_addresses = [t.data_ptr() for t in state]

    def __call__(self, *args: Any) -> Any:
        varying = args[self.fixed :]
        if args[0].device.type != "cuda":
            return self.fn(*args)
        if self.graph is None:
            self._capture(args)
        if [t.data_ptr() for t in self.state] != self.state_addresses:
            raise RuntimeError("GraphReplay: the cache state moved (new sizes or branch): its graph was captured on the old one")
        for i, (mine, given) in enumerate(zip(self.inputs, varying)):
            if isinstance(given, torch.Tensor) and given is not mine:
                if given.shape != mine.shape or given.dtype != mine.dtype:
                    raise RuntimeError(f"GraphReplay: input {i} is {tuple(given.shape)} {given.dtype}, captured as {tuple(mine.shape)} {mine.dtype}")
                mine.copy_(given)
        self.graph.replay()
        return self.outputs

    def _capture(self, args: tuple) -> None:
        self.inputs = [
            a.clone() if isinstance(a, torch.Tensor) and id(a) not in self.outputs_of_replays else a for a in args[self.fixed :]
        ]
        full = [*args[: self.fixed], *self.inputs]
        saved = [t.clone() for t in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*full)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self.state, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn(*full)
        self.outputs_of_replays.update((id(t), t) for t in self.outputs if isinstance(t, torch.Tensor))


def own_graphs(model: torch.nn.Module) -> None:
    """Replace the engine's graphs (after a first request made them) with GraphReplay wrappers. A
    tail takes the head's tensors last: the head wrapper's outputs, so nothing is copied there."""
    engine = model._dittofx
    (entry,) = engine.entries
    (state,) = engine.states.values()
    tensors = state.tensors()
    fixed = len(tensors) + len(entry.slots) + len(entry.captured.constants)
    for decision in ("compute", "cache", "split-compute", "split-cache"):
        entry.graphs[decision] = GraphReplay(entry.graphs[decision], fixed, tensors)
    entry.head = GraphReplay(entry.graphs["split-head"], fixed, tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="pixart", choices=sorted(e2e.SPECS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, cpu = args.device, args.device == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    spec = e2e.SPECS[args.model]
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(*spec.latent, generator=g).to(device, dtype)
    inputs = tree_map(lambda t: t.to(device, dtype) if isinstance(t, torch.Tensor) else t, spec.conditioning(g))
    cfg = dict(e2e.CONFIGS[CONFIG][0], Fn_compute_blocks=e2e.FN, Bn_compute_blocks=e2e.BN, num_inference_steps=e2e.STEPS)
    clock = e2e.Clock(device)
    mode = {} if cpu else {"mode": "reduce-overhead"}
    with torch.no_grad():
        full, fn_bn = spec.build(device, dtype), spec.build(device, dtype, **spec.fn_bn_layers)
        split = dittofx.optimize(e2e.sharing_weights(full), cfg, split_at_decision=dict(mode))
        mine = dittofx.optimize(e2e.sharing_weights(full), cfg, split_at_decision=True)
        reference, _ = e2e.denoise(mine, spec, latents, inputs, clock)  # eager: builds the graphs, the schedule to match
        schedule = dittofx.summary(mine, log_table=False)[0].cached_steps
        own_graphs(mine)
        rows = {
            "baseline compiled": e2e.compiled_alone(e2e.sharing_weights(full), fullgraph=True, **mode),
            "Fn+Bn only compiled": e2e.compiled_alone(e2e.sharing_weights(fn_bn), fullgraph=True, **mode),
            "dittofx split, head compiled alike": e2e.compiled_alone(split, fullgraph=True, **mode),
            "dittofx own CUDA graphs (prototype)": mine,
        }
        steps: dict[str, list[list[float]]] = {name: [] for name in rows}
        outputs = {}
        began = time.perf_counter()
        for name, model in rows.items():  # warm-up: compile, record or capture
            outputs[name], _ = e2e.denoise(model, spec, latents, inputs, clock)
            print(f"[{time.perf_counter() - began:.0f} s] warmed up {name}", flush=True)
        for _ in range(args.repeats):
            for name, model in rows.items():
                outputs[name], seconds = e2e.denoise(model, spec, latents, inputs, clock)
                steps[name].append(seconds)
    medians = {name: [statistics.median(s) for s in zip(*runs)] for name, runs in steps.items()}
    full_step = statistics.median(medians["baseline compiled"])
    chain_step = statistics.median(medians["Fn+Bn only compiled"])
    ideal = (e2e.STEPS - len(schedule)) * full_step + len(schedule) * chain_step
    records = []
    for name in ("dittofx split, head compiled alike", "dittofx own CUDA graphs (prototype)"):
        model = split if "split" in name else mine
        cached = dittofx.summary(model, log_table=False)[0].cached_steps
        out = outputs[name].float()
        records.append({
            "row": name, "seconds": sum(medians[name]), "ideal_s": ideal, "speed_vs_ideal": ideal / sum(medians[name]),
            "cached_steps": cached, "same_schedule_as_eager": cached == schedule,
            "rel_err_vs_eager": ((out - reference.float()).norm() / reference.float().norm()).item(),
            "step_medians_s": medians[name],
        })  # fmt: skip
    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k != "step_medians_s"}), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
            "model": args.model, "config": CONFIG, "repeats": args.repeats, "baseline_step_s": full_step, "chain_step_s": chain_step,
            "command": "python " + " ".join(sys.argv)}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
