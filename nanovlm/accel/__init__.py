"""Speed paths, applied to a model from outside: the model files hold the plain maths once, and
these functions install faster forms of it (`compile.py`, `kernels.py`), or replace the decode
step with one C++ call on CPU (`fused_decode.py`, used by `generate(compile=True)`)."""

from nanovlm.accel.compile import apply_cpu_kernels, apply_training_kernels, compile_for_training

__all__ = ["apply_cpu_kernels", "apply_training_kernels", "compile_for_training"]
