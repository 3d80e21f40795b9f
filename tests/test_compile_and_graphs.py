"""``opt.step()`` inside ``torch.compile`` and inside a captured CUDA graph, per native backend.

Compiled: the step traces as a few opaque custom-op calls per bucket (fake implementations
give the shapes), so the graph breaks of a compiled training step do not grow with the
number of parameters, and the compiled run equals the eager one. The tests compile with
``backend="aot_eager"`` (FX capture, functionalisation and fake tensors, without
Inductor's code generation, which takes tens of seconds on the CI machine).

Captured: with its scalars on the device and its tables built on the first steps, a step
replays from a CUDA graph and equals the eager run (GPU only).
"""

from __future__ import annotations

import pytest
import torch

import alr
from helpers import assert_tensors_close

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Dynamo's own tracing of the resumed frame reads .grad of a non-leaf (not alr's code).
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"),
]

OPTIONS = dict(lr=1e-2, max_grad_norm=1.0, hypergrad_scope="tensor")
"""Clipping and per-tensor κ on top of the defaults (nonfinite check, mult hypergradient)."""


def _mlp(layers: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)]).to(device)


def _training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor):
    def step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def _assert_same_run(model_a, opt_a, model_b, opt_b) -> None:
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert_tensors_close(a.detach(), b.detach(), "param")
    for ka, kb in zip(opt_a.stats().kappa, opt_b.stats().kappa):
        assert_tensors_close(ka, kb, "kappa")


def test_compiled_training_step_equals_eager(backend: str, device: torch.device) -> None:
    torch._dynamo.reset()
    x = torch.randn(8, 16, device=device)
    eager_model, compiled_model = _mlp(3, device), _mlp(3, device)
    eager_opt = alr.ALROptimizer(eager_model.parameters(), backend=backend, **OPTIONS)
    compiled_opt = alr.ALROptimizer(compiled_model.parameters(), backend=backend, **OPTIONS)
    eager = _training_step(eager_model, eager_opt, x)
    compiled = torch.compile(_training_step(compiled_model, compiled_opt, x), backend="aot_eager")
    for _ in range(3):
        eager()
        compiled()
    _assert_same_run(eager_model, eager_opt, compiled_model, compiled_opt)
    assert not torch.equal(compiled_opt.stats().kappa[0], torch.ones_like(compiled_opt.stats().kappa[0]))


def test_graph_breaks_do_not_grow_with_parameter_count(backend: str, device: torch.device) -> None:
    """The breaks are the training step's own (``backward()``, ``zero_grad``), not one per
    parameter: 2 and 10 layers (4 and 20 tensors) break the same number of times."""
    breaks = []
    for layers in (2, 10):
        torch._dynamo.reset()
        model = _mlp(layers, device)
        opt = alr.ALROptimizer(model.parameters(), backend=backend, **OPTIONS)
        step = _training_step(model, opt, torch.randn(8, 16, device=device))
        step()  # builds state and tables eagerly, as a first training step does
        explanation = torch._dynamo.explain(step)()
        breaks.append(explanation.graph_break_count)
    assert breaks[0] == breaks[1] <= 3, breaks


@pytest.mark.cuda
@pytest.mark.parametrize("config", ["adamw-defaults", "sgd-momentum-clip"])
def test_captured_step_replays_like_eager(backend: str, device: torch.device, config: str) -> None:
    if device.type != "cuda":
        pytest.skip(f"{backend} runs on {device} here: CUDA graphs need a GPU backend")
    options = dict(algorithm="adamw") if config == "adamw-defaults" else dict(algorithm="sgd", momentum=0.9)
    options = {**OPTIONS, **options}
    shapes = [(64, 33), (33,), (4097,)]
    torch.manual_seed(0)
    ps = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    captured, eager = (alr.ALROptimizer(params, backend=backend, **options) for params in (ps, qs))
    grads = [[torch.randn(s, device=device) for s in shapes] for _ in range(6)]
    for p in ps:
        p.grad = torch.zeros_like(p)  # static gradients: graph replays read these addresses

    def set_grads(step: int) -> None:
        for p, q, g in zip(ps, qs, grads[step]):
            p.grad.copy_(g)
            q.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(2):  # warm-up on a side stream: state, tables, compiled kernels
            set_grads(step)
            captured.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    allocated = torch.cuda.memory_allocated()
    for step in range(2, 6):
        set_grads(step)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    for p, q in zip(ps, qs):
        assert_tensors_close(p.detach(), q.detach(), "param")
    for ka, kb in zip(captured.stats().kappa, eager.stats().kappa):
        assert_tensors_close(ka, kb, "kappa")
