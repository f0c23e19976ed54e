"""The Triton kernels, one module per operation. Imported only when a kernel runs, so
Triton stays optional."""
