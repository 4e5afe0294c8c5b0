"""The decoder activations, written once for every Triton kernel: forward, and backward from the output.

| helper                | computes                         | torch's formula it follows                           |
|-----------------------|----------------------------------|------------------------------------------------------|
| relu(x)               | x < 0 ? 0 : x                    | torch.relu (clamp_min: NaN stays NaN)                |
| relu_grad(g, y)       | y <= 0 ? 0 : g                   | threshold_backward(g, y, 0)                          |
| elu(x)                | x > 0 ? x : exp(x) - 1           | F.elu, alpha 1                                       |
| elu_grad(g, y)        | y <= 0 ? g (y + 1) : g           | elu_backward (x <= 0 iff y <= 0; exp(x) = y + 1)     |
| sigmoid(x)            | 1 / (1 + exp(-x))                | torch.sigmoid                                        |
| sigmoid_grad(g, y)    | g (1 - y) y                      | sigmoid_backward(g, y)                               |
| activate(x, ACT)      | one of the above by ``ACT``      | ACT_NONE, ACT_ELU, ACT_SIGMOID, ACT_RELU             |
| activate_grad(g, y, ACT) | its backward from the output y |                                                      |

NaN and Inf propagate as in torch by construction: only comparisons (false for NaN), ``tl.where`` and
arithmetic, never ``tl.minimum``/``tl.maximum``. Those lower to fminf/fmaxf on the GPU (default
``propagate_nan=NONE``), which return the other operand when one is NaN: a ReLU or ELU written with
them turns a NaN pre-activation into a finite value. The interpreter's numpy minimum/maximum do
propagate NaN, so no CPU test can see that bug; tests/test_nan_propagation.py checks the kernel
sources instead (every exp and clamp of an activation lives here).
"""
from __future__ import annotations

import triton
import triton.language as tl

ACT_NONE, ACT_ELU, ACT_SIGMOID, ACT_RELU = 0, 1, 2, 3


@triton.jit
def relu(x):
    return tl.where(x < 0, 0., x)


@triton.jit
def relu_grad(g, y):
    """dL/dx from g = dL/dy and y = relu(x); a NaN y passes g through, as torch's does."""
    return tl.where(y <= 0, 0., g)


@triton.jit
def elu(x):
    # exp only sees x <= 0 (or NaN): no overflow to inf in the branch that is not taken
    return tl.where(x > 0, x, tl.exp(tl.where(x > 0, 0., x)) - 1.)


@triton.jit
def elu_grad(g, y):
    """dL/dx from g = dL/dy and y = elu(x)."""
    return tl.where(y <= 0, g * (y + 1.), g)


@triton.jit
def sigmoid(x):
    return 1. / (1. + tl.exp(-x))


@triton.jit
def sigmoid_grad(g, y):
    """dL/dx from g = dL/dy and y = sigmoid(x)."""
    return g * (1. - y) * y


@triton.jit
def activate(x, ACT: tl.constexpr):
    if ACT == 1:
        x = elu(x)
    elif ACT == 2:
        x = sigmoid(x)
    elif ACT == 3:
        x = relu(x)
    return x


@triton.jit
def activate_grad(g, y, ACT: tl.constexpr):
    """d(pre-activation) from g = d(output) and the stored output y."""
    if ACT == 1:
        g = elu_grad(g, y)
    elif ACT == 2:
        g = sigmoid_grad(g, y)
    elif ACT == 3:
        g = relu_grad(g, y)
    return g
