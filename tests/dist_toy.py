"""A toy DiT whose blocks act per token (no attention), so a shard of the sequence gives exactly the
matching shard of the output; and the worker that `test_distributed.py` starts with torchrun."""

import os
import sys

import torch

STEPS = 10
TOKENS, DIM = 16, 8
CFG = {"residual_diff_threshold": 0.1, "max_warmup_steps": 1, "num_inference_steps": STEPS}
# per method, a config whose single-process schedule differs from what either half alone decides
CONFIGS = {
    "dbcache": CFG,
    "teacache": {"method": "teacache", "rel_l1_thresh": 0.3, "coefficients": [1.0, 0.0], "num_inference_steps": STEPS},
    "dbprune": {"method": "dbprune", "residual_diff_threshold": 0.1, "max_warmup_steps": 1, "num_inference_steps": STEPS},
}


class Block(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.mod = torch.nn.Linear(1, dim)

    def forward(self, hidden_states, temb):
        return hidden_states + self.mlp(hidden_states) * torch.tanh(self.mod(temb))[:, None]


class TokenDiT(torch.nn.Module):
    def __init__(self, dim: int = DIM, layers: int = 4):
        super().__init__()
        self.proj_in = torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(layers))
        self.proj_out = torch.nn.Linear(dim, dim)

    def forward(self, hidden_states, timestep):
        temb = timestep[:, None] / 1000
        hidden_states = self.proj_in(hidden_states)
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return self.proj_out(hidden_states)


def build() -> TokenDiT:
    torch.manual_seed(0)
    return TokenDiT().eval()


def inputs(step: int) -> dict:
    """The first half of the sequence drifts much faster than the second: each half alone would
    decide differently, only the global sums give the single-process decision."""
    g = torch.Generator().manual_seed(1)
    base, drift = torch.randn(1, TOKENS, DIM, generator=g), torch.randn(1, TOKENS, DIM, generator=g)
    speed = torch.cat([torch.full((TOKENS // 2,), 0.2), torch.full((TOKENS // 2,), 0.002)])[None, :, None]
    return dict(hidden_states=base + speed * step * drift, timestep=torch.tensor([1000.0 * (1 - step / STEPS)]))


def main(out_dir: str, use_group: bool, method: str) -> None:
    import torch.distributed as dist

    import dittofx

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = dittofx.optimize(build(), CONFIGS[method], process_group=dist.group.WORLD if use_group else None)
    shard = TOKENS // world
    outs = []
    with torch.no_grad():
        for s in range(STEPS):
            kw = inputs(s)
            kw["hidden_states"] = kw["hidden_states"][:, rank * shard : (rank + 1) * shard]
            outs.append(model(**kw))
    stats = dittofx.summary(model, log_table=False)[0]
    torch.save({"cached": stats.cached_steps, "pruned": stats.pruned_blocks, "outs": outs},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "group", sys.argv[3] if len(sys.argv) > 3 else "dbcache")
