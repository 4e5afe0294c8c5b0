"""Turn csrc's CUDA sources and glue into host C++ for the emulator (include/emu_runtime.h): transform.py CSRC OUT."""
import re, sys, pathlib
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(exist_ok=True)
bindings = (src / "torch_bindings.cpp").read_text()
defs = "\n".join(l for l in bindings.splitlines() if l.strip().startswith("m.def("))
for f in ["grouping_cuda.cu", "experts_cuda.cu", "wgrad_reduce_cuda.cu", "experts_cuda_glue.cpp"]:
    s = (src / f).read_text()
    s = re.sub(r"(\w+(?:<\w+>)?)<<<(.*?)>>>\((.*?)\);",
               lambda m: "emu::launch(" + ", ".join(
                   [f"dim3({a.strip()})" if i < 2 else a.strip() for i, a in enumerate(m.group(2).split(","))]) +
               f", [&] {{ {m.group(1)}({m.group(3)}); }});", s, flags=re.S)
    s = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];",
               r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_shared());", s)
    s = s.replace("__shared__", "static")
    s = s.replace("TORCH_LIBRARY_IMPL(smoe_fast, CUDA, m)", "TORCH_LIBRARY(smoe_emu, m) {\n" + defs + "\n}\nTORCH_LIBRARY_IMPL(smoe_emu, CPU, m)")
    s = s.replace('#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda()', '#define CHECK_CUDA(x) TORCH_CHECK(true')
    if f.endswith(".cu"):
        s = '#include "emu_runtime.h"\n' + s
    (out / (f.replace(".cu", "_emu.cpp") if f.endswith(".cu") else f.replace(".cpp", "_emu.cpp"))).write_text(s)
print("ok")
