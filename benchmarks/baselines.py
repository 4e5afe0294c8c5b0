"""What a user would run instead of smoe_fast: the pure-PyTorch baselines the benchmarks compare with.

| baseline                | stage         | what it does                                                   |
|-------------------------|---------------|----------------------------------------------------------------|
| sort_bincount_cumsum    | grouping      | torch.sort (stable) + bincount + cumsum + inverse permutation  |
| authors_per_sample_loop | hard          | the authors' inference: one nn.Module per expert, a Python     |
|                         |               | loop over samples                                              |
| authors_stacked_soft    | soft          | the authors' training: every expert on every sample,           |
|                         |               | torch.stack -> [B,E,1,28,28], weighted sum                     |
| per_expert_loop         | hard          | sort tokens by expert, a Python loop over experts on slices    |
| dense_gather            | hard          | every expert on every token in batched ops (bmm; grouped conv  |
|                         |               | with groups=E), then gather the chosen expert's output         |
| dense_soft              | soft          | the same dense pass mixed by the gates                         |
| dense_masked_topk       | top-k         | the dense pass with gates zero outside the k chosen experts    |
| grouped_mm              | hard (mlp)    | sort tokens, torch.nn.functional.grouped_mm per layer, unsort  |

The authors' modules (smoe_fast/authors.py) are written from PAPER.md's layer tables and loaded from
the stacked weights, so every baseline computes the same function as ``smoe_fast.ops`` on the same weights (the benchmarks
check each output against the reference backend).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from smoe_fast import reference
from smoe_fast.vae.authors import decoders_from_stacked, per_sample_loop, stacked_soft
from smoe_fast.contract import IMAGE_SHAPE
from smoe_fast.reference import decode


def weight_bytes_per_expert(weights: dict[str, torch.Tensor]) -> int:
    return sum(w[0].numel() * w.element_size() for w in weights.values())


# ----------------------------------------------------------------------------- grouping
# The textbook torch pipeline (stable sort, bincount, cumsum, inverse permutation) is exactly what the
# reference backend runs.
sort_bincount_cumsum = reference.group_by_expert

# ----------------------------------------------------------------------------- the authors' formulation
authors_decoders = decoders_from_stacked        # one nn.Module per expert, holding copies of the weights
authors_per_sample_loop = per_sample_loop       # inference: a Python loop over samples
authors_stacked_soft = stacked_soft             # training: stack [B,E,1,28,28], weight by the gates


# ----------------------------------------------------------------------------- loop over sorted tokens
def per_expert_loop(z: torch.Tensor, expert_idx: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Sort tokens by expert, then one decoder call per non-empty expert on its contiguous slice."""
    num_experts = next(iter(weights.values())).shape[0]
    sorted_expert, sorted_token_idx = torch.sort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=num_experts).tolist()  # host sync: the loop needs sizes
    z_sorted = z[sorted_token_idx]
    out = z.new_empty(z.shape[0], *IMAGE_SHAPE)
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = sorted_token_idx[start:start + count]
            out[rows] = decode(z_sorted[start:start + count], {n: w[e] for n, w in weights.items()}, kind)
            start += count
    return out


# ----------------------------------------------------------------------------- dense: every expert, then pick
def dense_all_experts(z: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Every expert on every token in batched ops: [B,L] -> [B,E,1,28,28] (bmm for linear layers,
    grouped convolution with groups=E for the conv layers). Memory and work grow with B*E."""
    B, E = z.shape[0], next(iter(weights.values())).shape[0]
    if kind == "mlp":
        h = F.relu(torch.einsum("bl,ehl->beh", z, weights["fc1.weight"]) + weights["fc1.bias"])
        y = torch.einsum("beh,eoh->beo", h, weights["fc2.weight"]) + weights["fc2.bias"]
        return torch.sigmoid(y).view(B, E, *IMAGE_SHAPE)
    convs = ("conv1", "conv2") if kind == "lite" else ("conv1", "conv2", "conv3")
    channels = weights["fc.weight"].shape[1] // 49
    h = (torch.einsum("bl,eol->beo", z, weights["fc.weight"]) + weights["fc.bias"]).view(B, E * channels, 7, 7)
    for i, conv in enumerate(convs):
        w, bias = weights[f"{conv}.weight"], weights[f"{conv}.bias"]
        if kind == "lite" or i < 2:  # medium's conv3 runs at 28x28 without upsampling
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias.reshape(-1), padding=1, groups=E)
        h = F.elu(h) if i < len(convs) - 1 else torch.sigmoid(h)
    return h.view(B, E, *IMAGE_SHAPE)


def dense_gather(z: torch.Tensor, expert_idx: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Hard gating the dense way: compute all E outputs, keep the chosen one."""
    everything = dense_all_experts(z, weights, kind)
    return everything[torch.arange(z.shape[0], device=z.device), expert_idx]


def dense_soft(z: torch.Tensor, gates: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    return (gates[:, :, None, None, None] * dense_all_experts(z, weights, kind)).sum(1)


def dense_masked_topk(z, topk_idx, topk_gates, weights, kind: str) -> torch.Tensor:
    """Top-k the naive way: scatter the k gates into a dense [B,E] (zeros elsewhere), run every expert."""
    num_experts = next(iter(weights.values())).shape[0]
    gates = torch.zeros(z.shape[0], num_experts, device=z.device, dtype=topk_gates.dtype).scatter(1, topk_idx, topk_gates)
    return dense_soft(z, gates, weights, kind)


# ----------------------------------------------------------------------------- torch grouped GEMM
def _grouped_mm():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
    return fn


def grouped_mm_problem(device: torch.device | str, dtype=torch.float32) -> str | None:
    """Why the grouped_mm baseline cannot run here (None if it can), from a tiny probe."""
    try:
        fn = _grouped_mm()
        a = torch.randn(8, 32, device=device, dtype=dtype)
        b = torch.randn(2, 64, 32, device=device, dtype=dtype).transpose(1, 2)
        fn(a, b, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
        return None
    except Exception as exc:  # the op's support varies by torch version, GPU arch and dtype
        return (f"torch {torch.__version__} grouped_mm does not run {dtype} on {torch.device(device)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def grouped_mm_hard_mlp(z: torch.Tensor, expert_idx: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hard-gated mlp experts with torch's grouped GEMM: sort tokens, two grouped_mm calls, unsort."""
    grouped_mm = _grouped_mm()
    num_experts = weights["fc1.weight"].shape[0]
    sorted_expert, sorted_token_idx = torch.sort(expert_idx, stable=True)
    ends = torch.cumsum(torch.bincount(expert_idx, minlength=num_experts), 0).to(torch.int32)
    z_sorted = z[sorted_token_idx]
    h = grouped_mm(z_sorted, weights["fc1.weight"].transpose(1, 2), offs=ends)
    h = F.relu(h + weights["fc1.bias"][sorted_expert])
    y = grouped_mm(h, weights["fc2.weight"].transpose(1, 2), offs=ends)
    y = torch.sigmoid(y + weights["fc2.bias"][sorted_expert])
    out = torch.empty_like(y)
    out[sorted_token_idx] = y
    return out.view(-1, *IMAGE_SHAPE)


# ----------------------------------------------------------------------------- the whole model, authors' way
class AuthorsSMoEVAE(nn.Module):
    """An SMoEVAE's encoder and gate with the authors' decoders: one module per expert, the per-sample
    loop in eval and the stacked soft mixture in training. Returns the same SMoEOutput."""

    def __init__(self, model):
        super().__init__()
        self.encoder, self.gating_network = model.encoder, model.gating_network
        self.decoders = authors_decoders(model.experts.kind, {n: w.detach() for n, w in model.experts.weights().items()})

    def forward(self, x: torch.Tensor, sample: bool = True):
        from smoe_fast import SMoEOutput

        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        logits = self.gating_network(z)
        gates, expert_idx = torch.softmax(logits, -1), logits.argmax(-1)
        if self.training:
            recon = authors_stacked_soft(self.decoders, z, gates)
        else:
            recon = authors_per_sample_loop(self.decoders, z, expert_idx)
        return SMoEOutput(recon, mu, logvar, logits, gates, expert_idx)
