"""Builds the compiled twins of keysvc._fast with Cython.

KEYSVC_DEBUG_BUILD=1 compiles without optimisation, with debug symbols, line tracing for
coverage and profilers, and Cython's bounds and None checks left on.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = bool(os.environ.get("KEYSVC_DEBUG_BUILD"))

directives = {
    "language_level": 3,
    "embedsignature": True,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "linetrace": DEBUG,
}
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
compile_args = ["-O0", "-g3"] if DEBUG else []

extensions = [
    Extension(
        f"keysvc._fast._{name}_c",
        [f"keysvc/_fast/_{name}_c.py"],
        define_macros=macros,
        extra_compile_args=compile_args,
    )
    for name in ("query", "core")
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
