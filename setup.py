"""Build normcore's Cython kernels (pyx/*.pyx -> normcore._kernels.*).

Environment variables read at build time:

NORMCORE_REQUIRE_OPENMP=1  fail the build when the compiler cannot do OpenMP
                           (by default the build warns and the kernels run serially).
NORMCORE_NATIVE=1          compile with -march=native (by default the flags are portable).
NORMCORE_SANITIZE=LIST     compile and link with -fsanitize=LIST (e.g. "address,undefined"),
                           -O1 -g and no recovery: what scripts/sanitize.sh builds with.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PYX = HERE / "pyx"

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0 && omp_get_max_threads() > 0);
        return 0;
    }
    """
)


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _compiles(compiler, flags):
    """Whether a trivial C file compiles with `flags`."""
    tmp = tempfile.mkdtemp(prefix="normcore-flag-")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        Path("flag.c").write_text("int main(void) { return 0; }\n")
        compiler.compile(["flag.c"], extra_postargs=flags)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not supported"
        return False
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def _openmp_flags(compiler):
    """Compile and run a tiny OpenMP program; return (compile_args, link_args) or None."""
    if sys.platform == "win32" and compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    for cflags, lflags in candidates:
        tmp = tempfile.mkdtemp(prefix="normcore-omp-")
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            Path("probe.c").write_text(OPENMP_PROBE)
            objects = compiler.compile(["probe.c"], extra_postargs=cflags)
            compiler.link_executable(objects, "probe", extra_postargs=lflags)
            out = subprocess.run([os.path.join(tmp, "probe")], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip() == "1":
                return cflags, lflags
        except Exception:  # noqa: BLE001 - any failure means "no OpenMP with these flags"
            pass
        finally:
            os.chdir(cwd)
            shutil.rmtree(tmp, ignore_errors=True)
    return None


class BuildExt(build_ext):
    """build_ext that probes OpenMP once and sets the compiler flags of every kernel."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the kernels are independent: compile them side by side
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        flags = _openmp_flags(self.compiler)
        if flags is None:
            message = (
                "normcore: the C compiler cannot build OpenMP code; the kernels will run on one "
                "thread. Install an OpenMP runtime (libgomp / libomp) for parallel kernels."
            )
            if _truthy("NORMCORE_REQUIRE_OPENMP"):
                raise RuntimeError(message + " (NORMCORE_REQUIRE_OPENMP is set.)")
            warnings.warn(message, stacklevel=1)
            print("WARNING: " + message, file=sys.stderr)
            cflags, lflags = [], []
            # The SIMD pragmas of block_sums.h need no runtime: keep them where possible.
            if self.compiler.compiler_type != "msvc" and _compiles(self.compiler, ["-fopenmp-simd"]):
                cflags = ["-fopenmp-simd"]
        else:
            cflags, lflags = flags
        if self.compiler.compiler_type == "msvc":
            opt = ["/O2"]
        else:
            # -fno-math-errno: sqrt may be vectorised (nothing here reads errno).
            # -ffp-contract=off: no a * b + c fused into an FMA where the instruction set has one
            # (the AVX-512 clones, -march=native), so every variant rounds the same operations.
            opt = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
            if _truthy("NORMCORE_NATIVE"):
                opt.append("-march=native")
        sanitize = os.environ.get("NORMCORE_SANITIZE", "").strip()
        if sanitize:
            if self.compiler.compiler_type == "msvc":
                raise RuntimeError("NORMCORE_SANITIZE needs gcc or clang")
            san = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
            opt = ["-O1", "-fno-math-errno", "-ffp-contract=off"] + san
            lflags = lflags + san
        for ext in self.extensions:
            ext.extra_compile_args = opt + cflags + list(ext.extra_compile_args or [])
            ext.extra_link_args = lflags + list(ext.extra_link_args or [])
        super().build_extensions()


_LOCAL_REFERENCES = re.compile(
    r'^\s*include\s+"(?P<pxi>[^"]+)"'              # Cython include
    r'|^\s*from\s+(?P<from>\w+)\s+cimport'          # from X cimport ...
    r'|^\s*cimport\s+(?P<cimport>\w+)'              # cimport X
    r'|cdef\s+extern\s+from\s+"(?P<extern>[^"]+)"'   # a C header
    r'|^\s*#\s*include\s+"(?P<header>[^"]+)"'        # a C header's own includes
    r'|^\s*#\s*define\s+NC_TEMPLATE\s+"(?P<template>[^"]+)"',  # a template for_each_isa.h includes
    re.M,
)


def _depends(source):
    """The files of pyx/ that `source` reads, directly or through others: a module is rebuilt
    when one of them changes, and only then."""
    found, todo = set(), [source]
    while todo:
        path = todo.pop()
        for m in _LOCAL_REFERENCES.finditer(path.read_text()):
            name = next(v for v in m.groupdict().values() if v)
            if m.group("from") or m.group("cimport"):
                name += ".pxd"
            dep = PYX / name
            if dep.is_file() and dep not in found:
                found.add(dep)
                todo.append(dep)
    return sorted(os.path.relpath(p, HERE) for p in found)


def _extensions():
    import numpy
    from Cython.Build import cythonize

    sources = sorted(PYX.glob("*.pyx"))
    extensions = [
        Extension(
            f"normcore._kernels.{src.stem}",
            [os.path.relpath(src, HERE)],
            # numpy's headers: the engine reads arrays through the NumPy C API (cimport numpy)
            include_dirs=[os.path.relpath(PYX, HERE), numpy.get_include()],
            depends=_depends(src),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for src in sources
    ]
    return cythonize(
        extensions,
        include_path=[str(PYX)],
        nthreads=os.cpu_count() or 1,  # the modules translate side by side, as they compile
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )


setup(
    packages=["normcore", "normcore._kernels", "normcore.plugins", "normcore.torch"],
    package_dir={"normcore.plugins": "plugins"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
