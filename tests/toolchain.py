"""Whether this machine can build C++ (imported by test modules; not a test itself).

torch.compile on CPU and the fused CPU decode step compile C++ code; without a compiler their
tests are skipped, the rest of the suite still runs. The fused step also needs ninja (a system
one, or the `cpu-fast` extra's package)."""

import importlib.util
import shutil

import pytest

HAS_CXX = shutil.which("c++") is not None or shutil.which("g++") is not None
HAS_NINJA = shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None

needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU and the fused CPU decode step "
                                                    "build C++ code: no C++ compiler (c++ or g++) found")
needs_cpu_fast = pytest.mark.skipif(not (HAS_CXX and HAS_NINJA),
                                    reason="the fused CPU decode step needs a C++ compiler and ninja "
                                           "(pip install -e '.[cpu-fast]')")
