"""Triton kernels for Tactic decode and clustering, imported as `tactic_server.kernels`.

Each kernel sits beside its launcher and the plain-torch reference it must match. Without CUDA
the launchers run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
