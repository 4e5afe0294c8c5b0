"""The SMoE-VAE of arXiv 2509.10025: a VAE whose decoder is a sparse mixture of experts.

Module and parameter names follow the authors' code, so their checkpoints map one-to-one
(``encoder.*``, ``gating_network.*``; the experts are stacked, ``decoders.{i}.*`` on export).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import Backend, check_backend_exists, resolve_backend
from ..contract import DECODER_KINDS, DEFAULT_MLP_HIDDEN, IMAGE_SHAPE, decoder_param_shapes
from ..experts import StackedExperts

ENCODER_KINDS = ("medium", "lite")
ROUTINGS = ("unsupervised", "supervised", "label", "random")
GATINGS = ("soft", "hard", "topk")


class MediumEncoder(nn.Module):
    """The paper's encoder: three ReLU convs (28 -> 28 -> 14 -> 7) and two linear heads."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.fc_mu = nn.Linear(128 * 7 * 7, latent_dim)
        self.fc_logvar = nn.Linear(128 * 7 * 7, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)


class LiteEncoder(nn.Module):
    """The authors' small encoder: two strided ELU convs (28 -> 14 -> 7) and two linear heads."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.fc_mu = nn.Linear(8 * 7 * 7, latent_dim)
        self.fc_logvar = nn.Linear(8 * 7 * 7, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.elu(self.conv2(F.elu(self.conv1(x)))).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)


class GatingNetwork(nn.Module):
    """z -> expert logits: Linear L->64, ReLU, Linear 64->32, ReLU, Linear 32->E."""

    def __init__(self, latent_dim: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, num_experts)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(z)))))


class SMoEOutput(NamedTuple):
    """What :class:`SMoEVAE` returns. B images, L latent size, E experts."""

    recon: torch.Tensor       # [B, 1, 28, 28] reconstruction x_hat
    mu: torch.Tensor          # [B, L]
    logvar: torch.Tensor      # [B, L]
    logits: torch.Tensor      # [B, E] gate logits
    gates: torch.Tensor       # [B, E] softmax(logits), the gate probabilities
    expert_idx: torch.Tensor  # [B] int64, the top-1 expert of each image (the label under label routing)


class SMoEVAE(nn.Module):
    """The SMoE-VAE with a fast expert dispatch backend.

    Args:
        num_experts: E, the number of decoder experts.
        latent_dim: L (the paper uses 32).
        encoder: "medium" (the paper's) or "lite".
        decoder: expert kind: "lite" (the paper's), "medium" or "mlp" (L -> hidden_dim -> 784).
        routing: "unsupervised" (soft in training, hard in eval: the paper), "supervised" (the
            authors' baseline: gate trained by cross-entropy on labels, hard routing throughout) or
            "label" (expert = class label, an oracle; needs ``labels`` in every forward) or "random"
            (each image to a uniformly random expert, drawn afresh in every forward from torch's RNG:
            the paper's control for learned routing; the gate is unused).
        gating: training-mode gating override: "soft", "hard" or "topk" (``top_k`` experts, gates
            renormalised). None: soft for unsupervised, hard for supervised. Eval always routes hard.
        backend: "auto", "reference", "triton" or "cpp" (see :mod:`smoe_fast.backends`).

    >>> model = SMoEVAE(num_experts=7, backend="reference")
    >>> out = model(torch.rand(16, 1, 28, 28))
    >>> out.recon.shape, out.gates.shape
    (torch.Size([16, 1, 28, 28]), torch.Size([16, 7]))
    """

    def __init__(self, num_experts: int = 10, latent_dim: int = 32, encoder: str = "medium", decoder: str = "lite",
                 routing: str = "unsupervised", backend: str = "auto", gating: str | None = None, top_k: int = 2,
                 hidden_dim: int = DEFAULT_MLP_HIDDEN):
        super().__init__()
        if encoder not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder {encoder!r}; expected one of {ENCODER_KINDS}")
        if decoder not in DECODER_KINDS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODER_KINDS}")
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
        if gating is not None and gating not in GATINGS:
            raise ValueError(f"unknown gating {gating!r}; expected None or one of {GATINGS}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be an integer >= 1, got {latent_dim!r}")
        if gating == "topk" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        if routing != "unsupervised" and gating not in (None, "hard"):
            raise ValueError(f"routing {routing!r} routes hard; gating={gating!r} applies to routing='unsupervised' only")
        self.backend = check_backend_exists(backend).value
        self.config = dict(num_experts=num_experts, latent_dim=latent_dim, encoder=encoder, decoder=decoder,
                           routing=routing, gating=gating, top_k=top_k, hidden_dim=hidden_dim)
        self.num_experts, self.latent_dim, self.routing, self.top_k = num_experts, latent_dim, routing, top_k
        self.gating = gating or ("soft" if routing == "unsupervised" else "hard")
        self.encoder = MediumEncoder(latent_dim) if encoder == "medium" else LiteEncoder(latent_dim)
        self.gating_network = GatingNetwork(latent_dim, num_experts)
        self.experts = StackedExperts(num_experts, latent_dim, decoder, hidden_dim)

    # ---------------------------------------------------------------- forward
    def resolved_backend(self, device: torch.device | str | None = None) -> Backend:
        """The concrete backend this model runs on ``device`` (default: where its parameters are)."""
        device = device if device is not None else next(self.parameters()).device
        return resolve_backend(self.backend, device)

    def set_backend(self, backend: str) -> "SMoEVAE":
        self.backend = check_backend_exists(backend).value
        return self

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, sample: bool = True,
                noise: torch.Tensor | None = None) -> SMoEOutput:
        """x [B, 1, 28, 28] in [0, 1] -> :class:`SMoEOutput`. ``sample=False`` uses z = mu.

        ``noise`` [B, L]: the standard-normal draw of the reparameterisation (default
        ``torch.randn_like(mu)``); data-parallel training passes per-sample keyed noise here.
        """
        mu, logvar = self.encode(x)
        if noise is not None and tuple(noise.shape) != tuple(mu.shape):
            raise ValueError(f"noise must have shape [B, L] = {tuple(mu.shape)}, got {tuple(noise.shape)}")
        eps = (torch.randn_like(mu) if noise is None else noise.to(mu)) if sample else None
        z = mu + eps * torch.exp(0.5 * logvar) if sample else mu
        recon, logits, gates, expert_idx = self.decode(z, labels)
        return SMoEOutput(recon, mu, logvar, logits, gates, expert_idx)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 1, 28, 28] -> (mu, logvar), each [B, L]."""
        return self.encoder(self._check_images(x))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None):
        """Route z [B, L] and run the experts -> (recon, logits, gates, expert_idx).

        Training mode uses the model's gating (soft, hard or topk); eval mode routes hard.
        """
        logits = self.gating_network(z)
        gates = torch.softmax(logits, dim=-1)
        backend = self.backend  # resolved (and cached) by the ops on z's device
        experts = self.experts
        if self.routing == "label":
            expert_idx = self._check_labels(labels, z.shape[0], "routing='label'")
        elif self.routing == "random":
            expert_idx = torch.randint(self.num_experts, (z.shape[0],), device=z.device)
        else:
            expert_idx = logits.argmax(-1)
        gating = self.gating if self.training else "hard"
        if gating == "soft" and self.routing == "unsupervised":
            recon = experts.soft(z, gates, backend=backend)
        elif gating == "topk" and self.routing == "unsupervised":
            topk_gates, topk_idx = gates.topk(self.top_k, dim=-1)
            recon = experts.topk(z, topk_idx, topk_gates / topk_gates.sum(-1, keepdim=True), backend=backend,
                                 check_indices=False)
        elif torch.is_grad_enabled() and self.training:
            # Hard routing while training: a top-1 "top-k" with constant gates, so the backend's
            # differentiable path runs and no reconstruction gradient reaches the gate (as published).
            recon = experts.topk(z, expert_idx[:, None], torch.ones_like(z[:, :1]), backend=backend, check_indices=False)
        else:
            recon = experts.hard(z, expert_idx, backend=backend, check_indices=False)
        return recon, logits, gates, expert_idx

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of images, got {type(x).__name__}")
        if x.dim() == 3 and tuple(x.shape[1:]) == IMAGE_SHAPE[1:]:
            x = x.unsqueeze(1)
        if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"x must have shape [B, 1, 28, 28] (or [B, 28, 28]), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
        return x

    def _check_labels(self, labels, batch: int, why: str) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"{why} needs class labels: call model(x, labels)")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != batch:
            found = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have shape [B] = [{batch}], got {found}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_experts):
            raise ValueError(f"labels must lie in [0, {self.num_experts - 1}] ({why} uses one expert per class), "
                             f"found values in [{int(labels.min())}, {int(labels.max())}]")
        return labels.long()

    # ---------------------------------------------------------------- checkpoints
    def authors_state_dict(self) -> dict[str, torch.Tensor]:
        """This model in the authors' layout: ``encoder.*``, ``gating_network.*``, ``decoders.{i}.*``."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("experts.")}
        for e in range(self.num_experts):
            for name, w in self.experts.expert_state_dict(e).items():
                state[f"decoders.{e}.{name}"] = w
        return state

    def load_authors_state_dict(self, state: dict[str, torch.Tensor]) -> "SMoEVAE":
        """Load a state_dict in the authors' layout; raises naming any mismatch (E, decoder kind, shapes)."""
        num_experts, kind = _authors_decoder_layout(state)
        if num_experts != self.num_experts:
            raise ValueError(f"checkpoint has {num_experts} experts (decoders.0 .. decoders.{num_experts - 1}), "
                             f"this model has num_experts={self.num_experts}")
        if kind != self.experts.kind:
            raise ValueError(f"checkpoint decoders are {kind!r} experts, this model has decoder={self.experts.kind!r}")
        ours = {k: v for k, v in state.items() if not k.startswith("decoders.")}
        for name, param in self.experts.weights().items():
            per_expert = []
            for e in range(num_experts):
                w = state[f"decoders.{e}.{name}"]
                if tuple(w.shape) != tuple(param.shape[1:]):
                    raise ValueError(f"checkpoint tensor decoders.{e}.{name} has shape {tuple(w.shape)}, "
                                     f"expected {tuple(param.shape[1:])}")
                per_expert.append(w)
            ours[f"experts.{name}"] = torch.stack(per_expert)
        expected = set(self.state_dict())
        if set(ours) != expected:
            missing, unexpected = sorted(expected - set(ours)), sorted(set(ours) - expected)
            raise ValueError(f"checkpoint does not match this model: missing {missing}, unexpected {unexpected}")
        for name, ref in self.state_dict().items():
            if tuple(ours[name].shape) != tuple(ref.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(ours[name].shape)}, expected {tuple(ref.shape)}")
        self.load_state_dict(ours)
        return self

    @classmethod
    def load_authors_checkpoint(cls, path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
                                decoder: str | None = None, **kwargs: Any) -> "SMoEVAE":
        """Build a model from the authors' checkpoint (``vae_moe_model_final.pth`` or its state_dict).

        E, L and the encoder are read from the checkpoint; ``decoder`` (if given) must match it.
        Other keyword arguments (routing, backend, gating, ...) go to the constructor.
        """
        state = _load_state(path_or_state_dict)
        num_experts, kind = _authors_decoder_layout(state)
        if decoder is not None and decoder != kind:
            raise ValueError(f"checkpoint decoders are {kind!r} experts "
                             f"(layers {sorted({k.split('.')[2] for k in state if k.startswith('decoders.0.')})}), "
                             f"but decoder={decoder!r} was requested")
        if "encoder.fc_mu.weight" not in state:
            raise ValueError("checkpoint has no encoder.fc_mu.weight: not an SMoE-VAE checkpoint in the authors' layout")
        latent_dim = state["encoder.fc_mu.weight"].shape[0]
        encoder = "medium" if "encoder.conv3.weight" in state else "lite"
        if kind == "mlp":
            kwargs.setdefault("hidden_dim", state["decoders.0.fc1.weight"].shape[0])
        model = cls(num_experts=num_experts, latent_dim=latent_dim, encoder=encoder, decoder=kind, **kwargs)
        return model.load_authors_state_dict(state)


def _load_state(path_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"could not read checkpoint {path!r} as a torch state_dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("checkpoint must be a state_dict (a dict of parameter name -> tensor)")
    return state


def _authors_decoder_layout(state: dict[str, torch.Tensor]) -> tuple[int, str]:
    """(E, decoder kind) of a state_dict in the authors' ``decoders.{i}.*`` layout."""
    indices = {int(k.split(".")[1]) for k in state if k.startswith("decoders.") and k.split(".")[1].isdigit()}
    if not indices:
        raise ValueError("checkpoint has no decoders.{i}.* tensors: not in the authors' SMoE-VAE layout")
    num_experts = max(indices) + 1
    if indices != set(range(num_experts)):
        raise ValueError(f"checkpoint decoders are not numbered 0..{num_experts - 1}: missing {sorted(set(range(num_experts)) - indices)}")
    names = {k.split(".", 2)[2] for k in state if k.startswith("decoders.0.")}
    for kind in DECODER_KINDS:
        expected = decoder_param_shapes(kind, 1)
        if names != set(expected):
            continue
        if kind != "mlp" and state["decoders.0.fc.weight"].shape[0] != expected["fc.weight"][0]:
            raise ValueError(f"checkpoint decoders.0.fc.weight has shape {tuple(state['decoders.0.fc.weight'].shape)}; "
                             f"a {kind!r} expert expects {expected['fc.weight'][0]} rows")
        return num_experts, kind
    raise ValueError(f"checkpoint decoder layers {sorted(names)} match no decoder kind {DECODER_KINDS}")
