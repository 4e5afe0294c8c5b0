"""Reading a compiled Triton kernel: ptxas's resource report, the PTX and the TTGIR.

Kept to what triton 3.6 and 3.9 both produce: ``ptxas -v`` lines ("Used N registers", "N bytes spill
stores, N bytes spill loads"), PTX mnemonics, and TTGIR ops with their ``#ttg.blocked`` /
``#ttg.nvidia_mma`` layouts and ``loc(callsite(...))`` locations.
"""
from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------------
# ptxas -v
# ----------------------------------------------------------------------------------------------------


def ptxas_usage(log: str) -> dict[str, int]:
    """{"registers", "spill_stores", "spill_loads", "stack"} from ptxas -v's report (-1 when absent)."""
    def first(pattern: str) -> int:
        found = re.findall(pattern, log)
        return max(int(v) for v in found) if found else -1

    return {"registers": first(r"Used (\d+) registers"), "spill_stores": first(r"(\d+) bytes spill stores"),
            "spill_loads": first(r"(\d+) bytes spill loads"), "stack": first(r"(\d+) bytes stack frame")}


# ----------------------------------------------------------------------------------------------------
# PTX
# ----------------------------------------------------------------------------------------------------

_GLOBAL_ACCESS = re.compile(r"^\s*(?:@%p\d+\s+)?(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[busf]\d+", re.M)


def ptx_stats(ptx: str) -> dict[str, int]:
    """Static instruction counts: tensor-core instructions, global loads/stores by vector width."""
    stats = {"mma": len(re.findall(r"^\s*(?:@%p\d+\s+)?mma\.sync", ptx, re.M)),
             "wgmma": len(re.findall(r"^\s*(?:@%p\d+\s+)?wgmma\.mma_async", ptx, re.M)),
             "global_access": 0, "global_vector_access": 0,
             "local_access": len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:ld|st)\.local", ptx, re.M))}
    for _, width in _GLOBAL_ACCESS.findall(ptx):
        stats["global_access"] += 1
        stats["global_vector_access"] += int(bool(width) and int(width) >= 2)
    return stats


# ----------------------------------------------------------------------------------------------------
# TTGIR
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """A source location: file, line, and the enclosing Python function's name."""
    file: str
    line: int
    function: str


@dataclass(frozen=True)
class Dot:
    chain: tuple[Site, ...]      # innermost (the tl.dot line) first, the kernel's own line last
    m: int
    n: int
    k: int
    operand: str                 # "f32", "bf16", ...
    unit: str                    # "wgmma" | "mma" | "fma"

    def mma_instructions(self) -> int:
        """Tensor-core instructions one execution of this dot issues (mma.sync m16n8kX, or wgmma
        m64nNkX with N up to 256), 0 on the FMA units."""
        k_step = {"f32": 8, "tf32": 8, "bf16": 16, "f16": 16}.get(self.operand, 16)
        if self.unit == "mma":
            return -(-self.m // 16) * -(-self.n // 8) * -(-self.k // k_step)
        if self.unit == "wgmma":
            return -(-self.m // 64) * -(-self.n // 256) * -(-self.k // k_step)
        return 0


@dataclass(frozen=True)
class Access:
    chain: tuple[Site, ...]
    op: str                      # "load" | "store" | "atomic"
    shape: tuple[int, ...]
    dtype: str
    vector: int                  # contiguous elements per thread along the layout's fastest dimension
    lanes: int                   # threads of a warp along that dimension

    @property
    def vectorised(self) -> bool:
        return self.vector >= 2


_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)$", re.M)
_LAYOUT_DEF = re.compile(r"^(#[\w]+) = #ttg\.(\w+)<\{(.*)\}>$", re.M)


@functools.lru_cache(maxsize=None)
def _functions_of(path: str) -> tuple[tuple[int, int, str], ...]:
    try:
        tree = ast.parse(open(path).read())
    except (OSError, SyntaxError):
        return ()
    return tuple((n.lineno, n.end_lineno or n.lineno, n.name) for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _function_at(path: str, line: int) -> str:
    best = ""
    best_span = None
    for start, end, name in _functions_of(path):
        if start <= line <= end and (best_span is None or end - start < best_span):
            best, best_span = name, end - start
    return best


class TTGIR:
    """The ops of one kernel's TTGIR that the audit reads, with their source call chains."""

    def __init__(self, text: str):
        self.text = text
        self.locs = {name: body for name, body in _LOC_DEF.findall(text)}
        self.layouts = {name: (kind, body) for name, kind, body in _LAYOUT_DEF.findall(text)}

    def chain(self, loc: str, depth: int = 0) -> tuple[Site, ...]:
        body = self.locs.get(loc, "")
        if depth > 64 or not body:
            return ()
        call = re.match(r"callsite\((#loc\d*) at (#loc\d*)\)$", body)
        if call:
            return self.chain(call.group(1), depth + 1) + self.chain(call.group(2), depth + 1)
        named = re.match(r'"[^"]*"\((#loc\d*)\)$', body)
        if named:
            return self.chain(named.group(1), depth + 1)
        site = re.match(r'"([^"]+)":(\d+):\d+', body)
        if site:
            path, line = site.group(1), int(site.group(2))
            return (Site(path.rsplit("/", 1)[-1], line, _function_at(path, line)),)
        return ()

    def _layout(self, name: str) -> tuple[str, dict]:
        kind, body = self.layouts.get(name, ("", ""))
        fields = {key: [int(v) for v in re.findall(r"-?\d+", value)]
                  for key, value in re.findall(r"(\w+) = \[([^\]]*)\]", body)}
        return kind, fields

    def dots(self) -> list[Dot]:
        out = []
        # wgmma (ttng.warp_group_dot) reads an operand from shared memory: a !ttg.memdesc, not a tensor
        pattern = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*?: (?:tensor|!ttg\.memdesc)<([\dx]+)x(\w+),.*?\* "
                             r"(?:tensor|!ttg\.memdesc)<([\dx]+)x\w+,.*?-> tensor<[\dx]+x\w+, (#[\w]+)>.*?loc\((#loc\d*)\)")
        for op, a_shape, operand, b_shape, result_layout, loc in pattern.findall(self.text):
            m, k = (int(v) for v in a_shape.split("x")[-2:])
            n = int(b_shape.split("x")[-1])
            kind, _ = self._layout(result_layout)
            unit = "wgmma" if op == "ttng.warp_group_dot" else "mma" if kind == "nvidia_mma" else "fma"
            out.append(Dot(self.chain(loc), m, n, k, operand, unit))
        return out

    def accesses(self) -> list[Access]:
        out = []
        # ttg.async_copy_global_to_local: the loads the software pipeliner turned into cp.async copies
        pattern = re.compile(r"= (tt\.load|ttg\.async_copy_global_to_local|tt\.store|tt\.atomic_rmw|tt\.atomic_cas)[^\n]*?"
                             r"tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#[\w]+)>[^\n]*?loc\((#loc\d*)\)")
        store_pattern = re.compile(r"^\s*tt\.store [^\n]*?: tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#[\w]+)>[^\n]*?"
                                   r"loc\((#loc\d*)\)", re.M)
        found = [(op, shape, dtype, layout, loc) for op, shape, dtype, layout, loc in pattern.findall(self.text)]
        found += [("tt.store", shape, dtype, layout, loc) for shape, dtype, layout, loc in store_pattern.findall(self.text)]
        for op, shape, dtype, layout, loc in found:
            kind, fields = self._layout(layout)
            order = fields.get("order", [0])
            fastest = order[0] if order else 0
            per_thread = fields.get("sizePerThread", [1])
            lanes = fields.get("threadsPerWarp", [1])
            vector = per_thread[fastest] if kind == "blocked" and fastest < len(per_thread) else 1
            lane = lanes[fastest] if kind == "blocked" and fastest < len(lanes) else 1
            name = {"tt.load": "load", "ttg.async_copy_global_to_local": "load", "tt.store": "store"}.get(op, "atomic")
            out.append(Access(self.chain(loc), name, tuple(int(v) for v in shape.split("x")), dtype, vector, lane))
        return out


def stage_dots(dots: list[Dot], function: str, occurrence: int, named: frozenset[str] = frozenset()) -> list[Dot]:
    """The dots a work-model stage names: those under ``function`` reached from its ``occurrence``-th
    call site (call sites ordered by source line; a kernel-level function has one). A dot under
    another of the stages' functions (``named``) nested inside ``function`` belongs to that stage, the
    innermost one: lite's conv1 helper runs conv2's parts GEMM (``_one_channel_parts``) inside it."""
    groups: dict[int, list[Dot]] = {}
    for dot in dots:
        for depth, site in enumerate(dot.chain):
            if site.function == function:
                caller = dot.chain[depth + 1].line if depth + 1 < len(dot.chain) else 0
                groups.setdefault(caller, []).append(dot)
                break
            if site.function in named:
                break
    ordered = [groups[line] for line in sorted(groups)]
    return ordered[occurrence] if occurrence < len(ordered) else []
