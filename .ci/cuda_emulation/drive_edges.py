import os, sys, glob
os.environ.setdefault("SMOE_FAST_POISON_OUTPUTS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import torch
torch.ops.load_library(glob.glob(os.environ["EMU_LIB"] + "/smoe_emu_ext*.so")[0])
from helpers import assert_close, random_weights
from smoe_fast import extension, reference
E_ = torch.ops.smoe_emu
kind, E = "lite", 3
w = random_weights(kind, E, seed=16); wl = extension._weight_list(w, kind)
z = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
# grouping with out-of-range indices
r = E_.cpp_group_by_expert(torch.tensor([2, 7, 0, -1, 2, 1, 3]), 3)
assert r[0].tolist() == [1, 1, 2] and r[1].tolist() == [0, 1, 2, 4] and r[2].tolist() == [2, 5, 0, 4, 1, 3, 6], r
print("ok group out-of-range", r[3].tolist())
idx = torch.tensor([0, 1, 99, 2, -5, 1, 0, 2, 1, 0]); good = (idx >= 0) & (idx < E)
out = E_.cpp_experts_hard(z, idx, wl, kind)
assert torch.isnan(out[~good]).all()
with torch.no_grad():
    assert_close(out[good], reference.experts_hard(z[good], idx[good], w, kind))
ti = torch.stack([idx, (idx.abs() + 1) % E], 1); tg = torch.full((10, 2), 0.5)
up = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(4))
out = E_.cpp_experts_topk_fwd(z, ti, tg, wl, kind)
assert torch.isnan(out[~good]).all() and not torch.isnan(out[good]).any()
gz, gg, gw = E_.cpp_experts_topk_bwd(up, z, ti, tg, wl, kind)
assert torch.isnan(gz[~good]).all() and torch.isnan(gg[~good, 0]).all() and not torch.isnan(gz[good]).any() and not torch.isnan(gg[:, 1]).any()
assert all(torch.isfinite(g).all() for g in gw)
# valid rows' grads against the reference on the valid slots only: token with bad slot 0 excluded entirely
print("ok out-of-range NaN rows")
# NaN token
zn = torch.randn(12, 32, generator=torch.Generator().manual_seed(2)); zn[5, 3] = float("nan")
gates = torch.rand(12, E, generator=torch.Generator().manual_seed(3)).softmax(-1)
up = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(5))
out = E_.cpp_experts_soft_fwd(zn, gates, wl, kind)
with torch.no_grad():
    ref = reference.experts_soft(zn, gates, w, kind)
assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[5]).all()
gz, gg, _ = E_.cpp_experts_soft_bwd(up, zn, gates, wl, kind)
zr, gr = zn.clone().requires_grad_(), gates.clone().requires_grad_()
reference.experts_soft(zr, gr, w, kind).backward(up)
keep = torch.arange(12) != 5
assert torch.isnan(gz[5]).all() and torch.isnan(gg[5]).all()
assert_close(gz[keep], zr.grad[keep]); assert_close(gg[keep], gr.grad[keep])
print("ok NaN token")
# determinism and correctness with many chunks (continuation partial slots)
B = int(os.environ.get("EMU_B", "300"))
zb = torch.randn(B, 32, generator=torch.Generator().manual_seed(7))
sc = torch.rand(B, 4, generator=torch.Generator().manual_seed(8)); tg, ti = sc.topk(2, 1); tg = tg / tg.sum(-1, keepdim=True)
w4 = random_weights(kind, 4, seed=9); wl4 = extension._weight_list(w4, kind)
up = torch.randn(B, 1, 28, 28, generator=torch.Generator().manual_seed(2))
a = E_.cpp_experts_topk_bwd(up, zb, ti, tg, wl4, kind); b = E_.cpp_experts_topk_bwd(up, zb, ti, tg, wl4, kind)
for x, y in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]]):
    assert torch.equal(x, y)
leaves = [t.clone().requires_grad_() for t in wl4]
wd = dict(zip(extension._weight_list({k: k for k in w4}, kind), leaves))
zz, gg_ = zb.clone().requires_grad_(), tg.clone().requires_grad_()
reference.experts_topk(zz, ti, gg_, wd, kind).backward(up)
for got, want in zip([a[0], a[1], *a[2]], [zz.grad, gg_.grad, *[l.grad for l in leaves]]):
    assert_close(got, want)
print("ok many chunks topk: deterministic and matches the reference")
