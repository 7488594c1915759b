"""runtime/compile_context.py: a module's pre-hook (run under its own disable, as dittofx's) finds
the torch.compile its call runs under, and nothing where the call is eager or dynamo is disabled
around it; which compiles record CUDA graphs."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from dittofx.runtime.compile_context import enclosing_compile, records_cuda_graphs


class Plus(torch.nn.Module):
    def forward(self, x):
        return x + 1


def hooked():
    found = []

    @torch._dynamo.disable
    def pre_hook(module, args):
        found.append(enclosing_compile())

    module = Plus()
    module.register_forward_pre_hook(pre_hook)
    return module, found


def test_the_compile_of_the_modules_call_is_found_and_compiles_alike():
    torch._dynamo.reset()
    module, found = hooked()
    counter = CompileCounter()
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    compiled(torch.ones(2))
    assert found == [compiled.dynamo_ctx]
    doubled = found[0](lambda x: x * 2)  # what dittofx does with the split head
    assert torch.equal(doubled(torch.ones(2)), torch.full((2,), 2.0))
    assert counter.frame_count == 2


def test_model_compile_in_place_is_found():
    torch._dynamo.reset()
    module, found = hooked()
    counter = CompileCounter()
    module.compile(backend=counter)
    module(torch.ones(2))
    assert isinstance(found[0], torch._dynamo.eval_frame._TorchDynamoContext)
    found[0](lambda x: x - 1)(torch.ones(2))
    assert counter.frame_count == 2


def test_an_eager_call_or_one_under_a_disable_finds_none():
    torch._dynamo.reset()
    module, found = hooked()
    module(torch.ones(2))

    @torch._dynamo.disable
    def eager_inside(x):
        return module(x)

    def outer(x):
        return eager_inside(x) * 2

    torch.compile(outer, backend=CompileCounter())(torch.ones(2))
    assert found == [None, None]


@pytest.mark.parametrize(
    "compile_args, records",
    [({}, False), ({"mode": "reduce-overhead"}, True), ({"mode": "max-autotune"}, True), ({"mode": "max-autotune-no-cudagraphs"}, False),
     ({"options": {"triton.cudagraphs": True}}, True), ({"backend": "cudagraphs"}, True), ({"backend": "eager"}, False),
     ({"backend": CompileCounter()}, False)],
)  # fmt: skip
def test_which_compiles_record_cuda_graphs(compile_args, records):
    assert records_cuda_graphs(torch.compile(Plus(), **compile_args).dynamo_ctx) is records


def test_inductors_global_cuda_graphs_setting_counts_for_inductor_however_named():
    from torch._inductor.compile_fx import compile_fx

    named = {"torch.compile": lambda: torch.compile(Plus()), "compile_fx": lambda: torch.compile(Plus(), backend=compile_fx),
             "dynamo.optimize": lambda: torch._dynamo.optimize("inductor")(Plus())}  # fmt: skip
    for name, make in named.items():
        with torch._inductor.config.patch({"triton.cudagraphs": True}):
            assert records_cuda_graphs(make().dynamo_ctx), name
        assert not records_cuda_graphs(make().dynamo_ctx), name
    with torch._inductor.config.patch({"triton.cudagraphs": True}):
        assert not records_cuda_graphs(torch.compile(Plus(), options={"triton.cudagraphs": False}).dynamo_ctx)
