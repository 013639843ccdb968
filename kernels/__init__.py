"""Triton kernels for Tactic decode and clustering, imported as `tactic_server.kernels`.

Each kernel sits beside its launcher and the plain-torch reference it must match. Without CUDA
the launchers run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).

The default attention executor is decode_attention.sparse_decode: on the H100 it matches
FlashInfer's time over the same rows (benchmarks/results/decode_attention_*.md) and needs no host
synchronisation, while FlashInfer's plan() reads the row lengths on the host every step and layer;
flashinfer_decode.FlashInferSparseDecode stays as the tested alternative.
"""
