"""The whole SMoE-VAE (medium encoder, lite experts): eval forward (hard routing) and one training step
(soft gating: forward, the paper's loss, backward, Adam step), per backend and in the authors' formulation.

Encoder and gate are the same in every row, so differences come from the expert stage; GB/s and
TFLOP/s are not recorded here (the stage benchmarks in test_bench_experts.py carry them).
"""
import pytest
import torch

import baselines
from harness import (BACKENDS, DEVICE, EXPERTS, INPUT_SETS, MODEL_BATCHES, SOFT_MAX_PAIRS, TRAIN_BATCHES, Work,
                     authors_loop_tokens, check_close, reference_output, require_backend, rotating, run_case,
                     skip_if_too_many_pairs)
import smoe_fast


def _model(num_experts: int, backend: str):
    torch.manual_seed(0)
    return smoe_fast.SMoEVAE(num_experts=num_experts, encoder="medium", decoder="lite", backend=backend).to(DEVICE)


def _images(batch: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(batch, 1, 28, 28, generator=g).to(DEVICE),) for _ in range(INPUT_SETS)]


@pytest.mark.parametrize("batch", MODEL_BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("impl", (*BACKENDS, "authors_per_sample_loop"))
def test_model_eval_forward(benchmark, impl, num_experts, batch):
    model = _model(num_experts, require_backend(impl) if impl in BACKENDS else "reference").eval()
    tokens = batch if impl in BACKENDS else authors_loop_tokens(batch, MODEL_BATCHES)
    runner = model if impl in BACKENDS else baselines.AuthorsSMoEVAE(model).eval()
    sets = [(x[:tokens],) for (x,) in _images(batch)]

    def forward(x):
        with torch.no_grad():
            return runner(x, sample=False).recon

    out = run_case(benchmark, stage="model eval", impl=impl, num_experts=num_experts, batch=batch,
                   call=rotating(sets, forward), work=Work(tokens, None, None))
    if impl != "reference":
        def compute():
            with torch.no_grad():
                return model.set_backend("reference")(sets[0][0], sample=False).recon

        check_close(out, reference_output("model eval", "lite", num_experts, batch, compute)[:tokens], impl)


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("impl", (*BACKENDS, "authors_stacked_soft"))
def test_model_train_step(benchmark, impl, num_experts, batch):
    skip_if_too_many_pairs(batch, num_experts, SOFT_MAX_PAIRS, "soft-gated training")
    model = _model(num_experts, require_backend(impl) if impl in BACKENDS else "reference").train()
    runner = model if impl in BACKENDS else baselines.AuthorsSMoEVAE(model).train()
    optimizer = torch.optim.Adam(runner.parameters(), lr=1e-4)

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        loss = smoe_fast.smoe_loss(runner(x), x, num_experts=num_experts).total
        loss.backward()
        optimizer.step()
        return loss.detach()

    run_case(benchmark, stage="model train step", impl=impl, num_experts=num_experts, batch=batch,
             call=rotating(_images(batch), step), work=Work(batch, None, None))
