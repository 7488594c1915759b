"""An instrument for tests: what a step would make a GPU wait for."""

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts what would sync a GPU with the host: copies to the CPU, and scalar reads (`.item()`,
    `bool()`, a torch.cond predicate) of anything that is not such a host copy (or a view of one, or
    computed from host copies only).
    On this CPU-only machine the copies are real `_to_copy` calls, so they are seen. Not seen: what
    a custom op's Python implementation does inside (the mode is off while the op runs)."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.copies = 0
        self.reads = 0
        self.host: set[int] = set()
        self.keep: list[torch.Tensor] = []

    def _on_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and not is_fake(t) and t.untyped_storage().data_ptr() in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.higher_order.cond:
            pred, on_true, on_false, operands = args
            self.reads += not self._on_host(pred)
            branch = on_true if pred else on_false  # read outside the mode: counted once, above
            with self:
                return branch(*operands)
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default):
            self.reads += not self._on_host(args[0])
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            self.copies += 1
            self.keep.append(out)
            self.host.add(out.untyped_storage().data_ptr())
        elif self.host and func is not torch.ops.aten._to_copy.default:  # computed from host copies only: on the host too
            inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if inputs and all(map(self._on_host, inputs)):
                made = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                self.keep.extend(made)  # held while the mode runs: a freed one's address could be a device tensor's next
                self.host.update(t.untyped_storage().data_ptr() for t in made)
        return out


def reads_per_step(model, z, steps: int) -> list[tuple[int, int]]:
    """(host copies, scalar reads) of each step of one request of zoo model `z`."""
    per_step = []
    with torch.no_grad():
        for s in range(steps):
            with HostReads() as mode:
                model(**z.inputs(s, 1 - s / steps))
            per_step.append((mode.copies, mode.reads))
    return per_step
