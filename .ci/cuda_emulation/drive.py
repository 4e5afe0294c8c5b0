import os, sys, glob, itertools
os.environ.setdefault("SMOE_FAST_POISON_OUTPUTS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import torch
torch.ops.load_library(glob.glob(os.environ["EMU_LIB"] + "/smoe_emu_ext*.so")[0])
from helpers import assert_close, random_weights, routing_case
from smoe_fast import extension, reference
E_ = torch.ops.smoe_emu
fails = []

def check(name, fn):
    try:
        fn(); print("ok  ", name, flush=True)
    except Exception as exc:
        fails.append(name); print("FAIL", name, repr(exc)[:400], flush=True)

def z_of(b, dtype, seed=0):
    return torch.randn(b, 32, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)

def sort_routing(idx, E):
    flat = idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    order = torch.sort(flat, stable=True).indices
    pos = torch.empty_like(order); pos[order] = torch.arange(order.numel())
    return [t.int() for t in (counts, offsets, order, pos)]

def group_case(b, E, routing, k=None):
    def run():
        idx = routing_case(routing, b, E) if k is None else torch.rand(b, E, generator=torch.Generator().manual_seed(3)).topk(k, 1).indices
        got = E_.cpp_group_by_expert(idx, E)
        for g, w, f in zip(got, sort_routing(idx, E), ["counts", "offsets", "sorted", "pos"]):
            assert torch.equal(g, w), f
    return run

def grads(fn, tensors, weights, kind, up_seed=7):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    wl = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    out = fn(*leaves, wl)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(up_seed), dtype=torch.float64).to(out.dtype)
    names = extension._weight_list({k: k for k in wl}, kind)
    return out, torch.autograd.grad(out, leaves + [wl[n] for n in names], up), up

def ref_vs_emu(mode, b, E, kind, dtype, k=2, routing="uniform"):
    def run():
        w = random_weights(kind, E, dtype=dtype, seed=3)
        wl = extension._weight_list(w, kind)
        z = z_of(b, dtype)
        if mode == "hard":
            idx = routing_case(routing, b, E)
            out = E_.cpp_experts_hard(z, idx, wl, kind)
            with torch.no_grad():
                assert_close(out, reference.experts_hard(z, idx, w, kind), name="hard out")
            return
        if mode == "soft":
            gates = torch.randn(b, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64).softmax(-1).to(dtype)
            ref_fn = lambda z_, g_, w_: reference.experts_soft(z_, g_, w_, kind)
            out_ref, g_ref, up = grads(ref_fn, [z, gates], w, kind)
            out = E_.cpp_experts_soft_fwd(z, gates, wl, kind)
            gz, gg, gw = E_.cpp_experts_soft_bwd(up, z, gates, wl, kind)
        else:
            sc = torch.rand(b, E, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
            tg, ti = sc.topk(k, 1)
            if routing == "one_expert":
                ti = torch.full_like(ti, E - 1)
            tg = (tg / tg.sum(-1, keepdim=True)).to(dtype)
            ref_fn = lambda z_, g_, w_: reference.experts_topk(z_, ti, g_, w_, kind)
            out_ref, g_ref, up = grads(ref_fn, [z, tg], w, kind)
            out = E_.cpp_experts_topk_fwd(z, ti, tg, wl, kind)
            gz, gg, gw = E_.cpp_experts_topk_bwd(up, z, ti, tg, wl, kind)
        assert_close(out, out_ref, name="out")
        for got, want, nm in zip([gz, gg, *gw], g_ref, ["z", "gates"] + extension._weight_list({k: k for k in w}, kind)):
            assert_close(got, want, name="grad " + nm)
    return run

def half_case(mode, b, E, kind, dtype, half_weights, half_gates=False):
    # fp16 / bf16 z (and weights when half_weights): the kernels compute in fp32 on the rounded inputs,
    # so the fp32 reference on those inputs is the answer up to one rounding of each half output.
    def run():
        w = random_weights(kind, E, dtype=torch.float32, seed=3)
        if half_weights:
            w = {k: v.to(dtype) for k, v in w.items()}
        wr = {k: v.float() for k, v in w.items()}
        wl = extension._weight_list(w, kind)
        z = z_of(b, dtype)
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        if mode == "hard":
            idx = routing_case("uniform", b, E)
            out = E_.cpp_experts_hard(z, idx, wl, kind)
            assert out.dtype == dtype, out.dtype
            with torch.no_grad():
                assert_close(out, reference.experts_hard(z.float(), idx, wr, kind), rtol_rms=tol, name="hard out")
            return
        g = torch.Generator().manual_seed(5)
        if mode == "soft":
            gates = torch.randn(b, E, generator=g).softmax(-1)
            fwd, bwd, extra = E_.cpp_experts_soft_fwd, E_.cpp_experts_soft_bwd, ()
            ref_fn = lambda z_, g_, w_: reference.experts_soft(z_, g_, w_, kind)
        else:
            tg, ti = torch.rand(b, E, generator=g).topk(2, 1)
            gates = tg / tg.sum(-1, keepdim=True)
            fwd, bwd, extra = E_.cpp_experts_topk_fwd, E_.cpp_experts_topk_bwd, (ti,)
            ref_fn = lambda z_, g_, w_: reference.experts_topk(z_, ti, g_, w_, kind)
        if half_gates:
            gates = gates.to(dtype)
        out = fwd(z, *extra, gates, wl, kind)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        gz, gg, gw = bwd(up, z, *extra, gates, wl, kind)
        assert out.dtype == gz.dtype == dtype and gg.dtype == gates.dtype, (out.dtype, gz.dtype, gg.dtype)
        assert all(t.dtype == w0.dtype for t, w0 in zip(gw, wl)), [t.dtype for t in gw]
        leaves = [z.float().requires_grad_(), gates.float().requires_grad_()]
        wref = {k: v.clone().requires_grad_() for k, v in wr.items()}
        out_ref = ref_fn(leaves[0], leaves[1], wref)
        names = extension._weight_list({k: k for k in w}, kind)
        want = torch.autograd.grad(out_ref, leaves + [wref[n] for n in names], up.float())
        assert_close(out, out_ref, rtol_rms=tol, name="out")
        assert_close(gz, want[0], rtol_rms=tol, name="grad z")
        assert_close(gg, want[1], rtol_rms=tol if half_gates else 1e-5, name="grad gates")
        for got, ref, nm in zip(gw, want[2:], names):  # fp32 weights: fp32 gradients, fp32 tolerance
            assert_close(got, ref, rtol_rms=tol if half_weights else 1e-5, name="grad " + nm)
    return run

which = sys.argv[1] if len(sys.argv) > 1 else "all"
if which in ("all", "group"):
    for (b, E, r) in [(37, 5, "uniform"), (19, 4, "one_expert"), (23, 6, "even_only"), (1, 3, "uniform"), (3, 11, "uniform"),
                      (0, 3, "uniform"), (5000, 7, "skewed"), (3000, 20000, "uniform")]:
        check(f"group b{b} e{E} {r}", group_case(b, E, r))
    check("group topk k2", group_case(13, 5, None, k=2))
    check("group topk k4 many", group_case(2100, 33, None, k=4))
if which in ("all", "experts"):
    for dtype in (torch.float32, torch.float64):
        for kind in ("lite", "mlp", "medium"):
            check(f"hard {kind} {dtype}", ref_vs_emu("hard", 37 if kind != "medium" else 9, 5, kind, dtype))
            check(f"hard skewed {kind} {dtype}", ref_vs_emu("hard", 41 if kind != "medium" else 9, 7, kind, dtype, routing="skewed"))
            check(f"soft {kind} {dtype}", ref_vs_emu("soft", 13 if kind != "medium" else 6, 3, kind, dtype))
            check(f"topk {kind} {dtype}", ref_vs_emu("topk", 17 if kind != "medium" else 6, 5, kind, dtype, k=2))
        check(f"topk k=E lite {dtype}", ref_vs_emu("topk", 11, 3, "lite", dtype, k=3))
        check(f"topk one expert lite {dtype}", ref_vs_emu("topk", 23, 4, "lite", dtype, k=2, routing="one_expert"))
        check(f"soft b1 lite {dtype}", ref_vs_emu("soft", 1, 2, "lite", dtype))
        check(f"hard e>b lite {dtype}", ref_vs_emu("hard", 3, 11, "lite", dtype))
        check(f"soft b0 lite {dtype}", ref_vs_emu("hard", 0, 3, "lite", dtype))
if which in ("all", "half"):
    for dtype in (torch.float16, torch.bfloat16):
        for half_weights in (False, True):
            tag = f"{dtype} z, {'half' if half_weights else 'fp32'} weights"
            for kind in ("lite", "mlp"):
                check(f"half hard {kind} {tag}", half_case("hard", 37, 5, kind, dtype, half_weights))
                check(f"half soft {kind} {tag}", half_case("soft", 13, 3, kind, dtype, half_weights))
                check(f"half topk {kind} {tag}", half_case("topk", 17, 5, kind, dtype, half_weights))
            check(f"half topk medium {tag}", half_case("topk", 6, 3, "medium", dtype, half_weights))
        check(f"half topk lite half gates {dtype}", half_case("topk", 11, 4, "lite", dtype, False, half_gates=True))
print("FAILURES:", fails)
