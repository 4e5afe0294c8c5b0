"""The decoder activations, written once for every Triton kernel: forward, and backward from the output.

| helper                | computes                         | torch's formula it follows                           |
|-----------------------|----------------------------------|------------------------------------------------------|
| relu(x)               | max(x, 0), NaN if x is NaN       | torch.relu (clamp_min: NaN stays NaN)                |
| relu_grad(g, y)       | y <= 0 ? 0 : g                   | threshold_backward(g, y, 0)                          |
| elu(x)                | x > 0 ? x : exp(x) - 1           | F.elu, alpha 1                                       |
| elu_grad(g, y)        | y <= 0 ? g (y + 1) : g           | elu_backward (x <= 0 iff y <= 0; exp(x) = y + 1)     |
| sigmoid(x)            | 1 / (1 + exp(-x))                | torch.sigmoid                                        |
| sigmoid_grad(g, y)    | g y (1 - y)                      | sigmoid_backward(g, y)                               |
| activate(x, ACT)      | one of the above by ``ACT``      | ACT_NONE, ACT_ELU, ACT_SIGMOID, ACT_RELU             |
| activate_grad(g, y, ACT) | its backward from the output y |                                                      |

NaN and Inf propagate as in torch by construction: comparisons (false for NaN), ``tl.where``,
arithmetic, and ``tl.maximum`` only with ``propagate_nan=ALL`` (one ``max.NaN.f32``, sm_80+). The
default ``tl.minimum``/``tl.maximum`` (``propagate_nan=NONE``) lower to fminf/fmaxf on the GPU, which
return the other operand when one is NaN: a ReLU or ELU clamped with them turns a NaN pre-activation
into a finite value. Whether the interpreter shows that depends on the triton version (3.9 maps them
to np.fmin/np.fmax, NaN dropped as on the GPU), so tests/test_nan_propagation.py also checks the
kernel sources: every exp and clamp of an activation lives here.

Each form is also the cheapest one found in the audit's register and spill counts: ELU's exp may
overflow to inf in the branch ``tl.where`` discards (harmless, and one select fewer than clamping
its argument), and ReLU is one instruction.
"""
from __future__ import annotations

import triton
import triton.language as tl

ACT_NONE, ACT_ELU, ACT_SIGMOID, ACT_RELU = 0, 1, 2, 3


@triton.jit
def relu(x):
    return tl.maximum(x, 0., propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_grad(g, y):
    """dL/dx from g = dL/dy and y = relu(x); a NaN y passes g through, as torch's does."""
    return tl.where(y <= 0, 0., g)


@triton.jit
def elu(x):
    return tl.where(x > 0, x, tl.exp(x) - 1.)


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
    return g * y * (1. - y)


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
