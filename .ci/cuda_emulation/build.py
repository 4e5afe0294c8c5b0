"""Build the emulated CUDA ops (torch.ops.smoe_emu.*) from generated sources: build.py GEN_DIR OUT_DIR [flags]."""
import glob
import os
import sys

from torch.utils import cpp_extension

gen, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
here = os.path.dirname(os.path.abspath(__file__))
csrc = os.path.join(here, "..", "..", "csrc")
os.makedirs(out, exist_ok=True)
cpp_extension.load(name="smoe_emu_ext", sources=sorted(glob.glob(os.path.join(gen, "*.cpp"))),
                   extra_include_paths=[os.path.join(here, "include"), csrc],
                   extra_cflags=["-std=c++20", "-O1", "-g", "-pthread", "-Wno-unknown-pragmas", *flags],
                   extra_ldflags=["-pthread", *[f for f in flags if f.startswith("-fsan")]],
                   build_directory=out, is_python_module=False, verbose=False)
print("built", out)
