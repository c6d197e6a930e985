"""Whether this machine can build C++ (imported by test modules; not a test itself).

torch.compile on CPU and the fused CPU decode step compile C++ code; without a compiler their
tests are skipped, the rest of the suite still runs."""

import shutil

import pytest

HAS_CXX = shutil.which("c++") is not None or shutil.which("g++") is not None

needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU and the fused CPU decode step "
                                                    "build C++ code: no C++ compiler (c++ or g++) found")
