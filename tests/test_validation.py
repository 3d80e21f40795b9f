"""The validation layer (alr/validation.py): bad state or gradients raise before any kernel
of the step runs, naming the parameter, the tensor and the cause, on every backend; nothing
is written anywhere, in any param group."""

from __future__ import annotations

import pytest
import torch

import alr
from alr.validation import has_internal_overlap
from helpers import assert_bit_identical, snapshot


def _stepped(backend: str, device: torch.device, shapes=((4096,), (3, 5)), groups: int = 1, **options):
    """An AdamW optimizer over ``groups`` param groups of ``shapes``, after one step, with
    fresh gradients set for the next."""
    params = [torch.randn(s, device=device, requires_grad=True) for _ in range(groups) for s in shapes]
    per_group = len(shapes)
    param_groups = [{"params": params[i * per_group : (i + 1) * per_group]} for i in range(groups)]
    opt = alr.ALROptimizer(param_groups, lr=1e-2, backend=backend, **options)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


def _assert_raises_writing_nothing(opt, params, match: str) -> None:
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    for index, (a, b) in enumerate(zip(snapshot(opt, params), before)):
        assert_bit_identical(a, b, f"tensor {index}")


def test_checkpoint_with_a_short_state_tensor_raises(any_backend) -> None:
    """A checkpoint whose exp_avg has 1 element for a 4,096-element parameter (the Triton
    kernel used to read and write past its end)."""
    params, opt = _stepped(*any_backend)
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"][:1].clone()
    opt.load_state_dict(saved)
    _assert_raises_writing_nothing(
        opt, params, r"state 'exp_avg' of params\[0\] of param group 0 has shape \[1\], but the parameter has shape \[4096\]"
    )


def test_gradient_of_another_dtype_raises_naming_the_gradient(any_backend) -> None:
    """``p.grad.data = ...`` bypasses torch's grad setter (its bytes used to be reinterpreted)."""
    params, opt = _stepped(*any_backend)
    params[1].grad.data = params[1].grad.data.double()
    _assert_raises_writing_nothing(
        opt, params, r"the gradient of params\[1\] of param group 0 has dtype torch.float64, but torch.float32 is expected"
    )


def test_a_failing_group_leaves_every_group_unwritten(any_backend) -> None:
    """Atomic steps: the bad state is in the second group; the first is not stepped either."""
    params, opt = _stepped(*any_backend, groups=2)
    opt.load_state_dict(opt.state_dict())  # the plans are rebuilt at the next step
    opt.state[params[3]]["exp_avg_sq"] = opt.state[params[3]]["exp_avg_sq"].to(torch.float16)
    _assert_raises_writing_nothing(opt, params, r"state 'exp_avg_sq' of params\[1\] of param group 1 has dtype torch.float16")


def test_errors_name_named_parameters() -> None:
    model = torch.nn.Linear(3, 2)
    opt = alr.ALROptimizer(model.named_parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.bias.grad = torch.ones(2)
    model.bias.grad.data = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"the gradient of parameter 'bias' has shape \[3\], but the parameter has shape \[2\]"):
        opt.step()


def test_a_missing_state_tensor_of_a_loaded_checkpoint_is_created() -> None:
    """Validation checks what exists; a stream the checkpoint lacks starts fresh, as torch's
    lazy state does (a torch.optim.Adam checkpoint loaded with amsgrad on, say)."""
    params, opt = _stepped("reference", torch.device("cpu"))
    saved = opt.state_dict()
    del saved["state"][1]["exp_avg"]
    opt.load_state_dict(saved)
    opt.step()
    assert opt.state[params[1]]["exp_avg"].shape == params[1].shape


@pytest.mark.parametrize(
    ("tensor", "overlaps"),
    [
        (torch.zeros(3).expand(4, 3), True),
        (torch.zeros(3, 4).t(), False),
        (torch.zeros(4, 6)[:, ::2], False),
        (torch.zeros(2, 3).as_strided((2, 3), (1, 1)), True),
        (torch.zeros(1, 5).expand(1, 5), False),
        (torch.zeros(0, 3).expand(0, 3), False),
    ],
    ids=["expanded", "transposed", "strided-slice", "sliding-window", "size-1-dims", "empty"],
)
def test_internal_overlap(tensor: torch.Tensor, overlaps: bool) -> None:
    assert has_internal_overlap(tensor) is overlaps


def test_a_parameter_resized_after_a_step_raises_before_any_write(any_backend) -> None:
    """``p.data = torch.zeros(N)`` with a gradient of the new shape: the plan is rebuilt, and
    the state of the old shape is caught (the Triton kernel used to run past its end)."""
    params, opt = _stepped(*any_backend)
    params[0].data = torch.zeros(8192, device=params[0].device)
    params[0].grad = torch.ones_like(params[0])
    _assert_raises_writing_nothing(
        opt, params, r"state 'exp_avg' of params\[0\] of param group 0 has shape \[4096\], but the parameter has shape \[8192\]"
    )
