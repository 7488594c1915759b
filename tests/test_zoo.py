"""The tiny model zoo itself: deterministic and step-sensitive; the uncapturable entries raise in
torch.export. (That the capturable ones export exactly is checked through dittofx's capture:
test_dbcache_models' threshold-0 test compares it with eager bitwise over 4 steps, test_passes'
chain test reads every block's nn_module_stack.)"""

from __future__ import annotations

import functools

import pytest
import torch

try:
    from tests import zoo
except ImportError:  # pytest's rootdir-less import mode puts tests/ itself on sys.path
    import zoo

torch.set_num_threads(1)

CAPTURABLE = zoo.names(capturable=True)
NOT_CAPTURABLE = zoo.names(capturable=False)


def _first(out):
    """First output tensor (Z-Image returns a list of per-sample tensors; Kandinsky 5 with
    return_dict=False returns the bare tensor, not a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    out = out[0]
    return out[0] if isinstance(out, (list, tuple)) else out


@functools.lru_cache(maxsize=None)
def _model(name):
    return zoo.get(name).build()


def _eager(name, step, t):
    with torch.no_grad():
        return _first(_model(name)(**zoo.get(name).inputs(step, t), return_dict=False))


def test_registry():
    assert len(CAPTURABLE) >= 14
    assert set(NOT_CAPTURABLE) == {"hidream", "lumina2", "bria_fibo2_mask", "omnigen", "qwenimage21", "hunyuanvideo15"}
    for name, zm in zoo.ZOO.items():
        assert zm.name == name and zoo.get(name) is zm


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_build_and_block_lists(name):
    zm = zoo.get(name)
    model = _model(name)
    assert type(model).__name__ == zm.cls_name
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    sizes = []
    for path in zm.block_lists:
        blocks = model.get_submodule(path)
        assert isinstance(blocks, torch.nn.ModuleList), path
        assert 2 <= len(blocks) <= 4, path
        sizes.append(len(blocks))
    assert sum(sizes) >= 4
    # seeded: a second build has identical weights
    again = zm.build()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_inputs_deterministic_and_drift(name):
    zm = zoo.get(name)
    a, b, c = zm.inputs(3, 0.8), zm.inputs(3, 0.8), zm.inputs(4, 0.8)
    assert a.keys() == b.keys()
    flat_a, _ = torch.utils._pytree.tree_flatten(a)
    flat_b, _ = torch.utils._pytree.tree_flatten(b)
    flat_c, _ = torch.utils._pytree.tree_flatten(c)
    changed = 0
    for x, y, z in zip(flat_a, flat_b, flat_c):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
            if not torch.equal(x, z):
                changed += 1
                rel = ((x - z).norm() / x.norm()).item()
                assert rel < 0.1, rel  # slow drift: consecutive steps are close
        else:
            assert x == y == z
    assert changed == 1  # only the latent drifts; text embeddings are the same every step


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_eager_deterministic_and_step_sensitive(name):
    out = _eager(name, 2, 0.9)
    assert torch.isfinite(out).all()
    assert torch.equal(out, _eager(name, 2, 0.9))
    assert not torch.equal(out, _eager(name, 3, 0.86))  # next step
    assert not torch.equal(out, _eager(name, 2, 0.5))  # timestep alone matters


@pytest.mark.parametrize("name", NOT_CAPTURABLE)
def test_export_raises(name):
    zm = zoo.get(name)
    with torch.no_grad(), pytest.raises(Exception):
        torch.export.export(_model(name), (), zm.inputs(0, 1.0), strict=False)
