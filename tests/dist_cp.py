"""The worker `test_distributed.py` starts with torchrun: a tiny Wan transformer under diffusers'
own context parallelism (Ulysses over 2 CPU processes, gloo), then `dittofx.optimize` with no
process_group: the group comes from the model's parallel config."""

import os
import sys

import torch

STEPS = 10
CFG = {"residual_diff_threshold": 0.1, "max_warmup_steps": 1, "num_inference_steps": STEPS}


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import dittofx
    import zoo

    # diffusers 0.42.1 picks the device as rank % torch.accelerator.device_count(), which is 0 on a
    # CPU-only host (ZeroDivisionError in ModelMixin._resolve_parallel_config); everything else
    # about its context parallelism runs on CPU with gloo.
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo")
    z = zoo.get("wan")
    model = z.build()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    dittofx.optimize(model, CFG)
    with torch.no_grad():
        outs = [model(**z.inputs(s, 1 - s / STEPS), return_dict=False)[0] for s in range(STEPS)]
    stats = dittofx.summary(model, log_table=False)[0]
    late = dittofx.optimize(z.build(), CFG)  # the wrong order: refused on the first call, dittofx detached
    late.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    try:
        late(**z.inputs(0, 1.0), return_dict=False)
        refused = ""
    except ValueError as err:
        refused = str(err) if "_dittofx" not in late.__dict__ else "still attached"
    torch.save({"cached": stats.cached_steps, "diffs": stats.diffs, "outs": outs, "refused": refused},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
