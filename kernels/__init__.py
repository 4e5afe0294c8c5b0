"""Triton kernels for smoe_fast (import name ``smoe_fast.kernels``). Importing this imports triton."""
