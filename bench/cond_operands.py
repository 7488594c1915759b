"""What an operand of a torch.cond costs a compiled call that takes the cheap branch.

A step decided on the device runs one graph whose torch.cond takes every weight of the middle
blocks as an operand (the compute branch reads them), so a cached step passes ~300-700 tensors it
never reads. Each is still touched at every call: dynamo's guard on the input, AOTAutograd's
wrapper, inductor's unpacking, its size/stride assert before the cond (and `del`). This toy times a
compiled module whose cond takes `x` and N unused 64x64 weights and always picks the cheap branch,
with N = 1 and 350, inductor's size asserts on and off (`torch.compile(options=...)`, per graph),
warm (timed right after a call of its own) and cold (64 MiB written before the call, as a model's
other work does). Each row has a code object of its own; rows are timed in interleaved rounds;
medians.

    python bench/cond_operands.py --out bench/results/cond_operands_cpu_<date>.json

CPU only (what it explains is host time); its wall-clock figures are not speed claims.
"""

import argparse
import json
import statistics
import sys
import time
import types
from datetime import date
from pathlib import Path

import torch

from dittofx.runtime.engine import with_own_code


class CondOverWeights(torch.nn.Module):
    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights = weights  # a plain list: passed as inputs, as dittofx's leading inputs are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def cache(x, *w):
            return x * 2

        def compute(x, *w):
            for t in w:
                x = x + t[0]
            return x

        return torch.cond(x.sum() > 1e9, compute, cache, (x, *self.weights))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--operands", type=int, nargs="+", default=[1, 350])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, flush = torch.randn(64), torch.empty(16 * 2**20)  # 64 MiB
    rows = {}
    for n in args.operands:
        weights = [torch.randn(64, 64) for _ in range(n)]
        for asserts in (True, False):
            for cold in (False, True):
                module = CondOverWeights(weights)
                # a code object per row: rows sharing one would each walk the others' dynamo cache entries
                module.forward = types.MethodType(with_own_code(CondOverWeights.forward), module)
                rows[(n, asserts, cold)] = torch.compile(module, fullgraph=True, options={"size_asserts": asserts})
    times: dict[tuple, list[float]] = {k: [] for k in rows}
    with torch.no_grad():
        for model in rows.values():
            for _ in range(10):
                model(x)
        for _ in range(args.rounds):
            for (n, asserts, cold), model in rows.items():
                if cold:
                    flush.fill_(1.0)
                else:  # warm: right after a call of its own
                    model(x)
                start = time.perf_counter()
                model(x)
                times[(n, asserts, cold)].append(time.perf_counter() - start)
    table = [
        {"operands": n, "size_asserts": a, "caches": "cold" if c else "warm", "median_us": statistics.median(t) * 1e6}
        for (n, a, c), t in times.items()
    ]
    print(f"{'operands':>8s} {'size asserts':>12s} {'caches':>6s} {'median us':>10s}")
    for r in table:
        print(f"{r['operands']:8d} {str(r['size_asserts']):>12s} {r['caches']:>6s} {r['median_us']:10.1f}")
    if args.out:
        result = {"date": date.today().isoformat(), "device": "cpu", "torch": torch.__version__, "threads": 1,
                  "rounds": args.rounds, "command": "python " + " ".join(sys.argv), "rows": table}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
