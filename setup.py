"""Builds fimoda_kernels._C with CMake + Ninja (see CMakeLists.txt for the options).

Environment: FIMODA_CUDA=0|1 (default: CUDA when nvcc is found), FIMODA_NATIVE=1,
CMAKE_CUDA_ARCHITECTURES or TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX"), FIMODA_BUILD_TYPE,
MAX_JOBS.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_archs_from_torch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", spaces allowed) -> CMake form ("80-real;90-real;90-virtual")."""
    archs = []
    for item in value.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.removesuffix("+PTX").replace(".", "")
        archs.append(f"{num}-real")
        if ptx:
            archs.append(f"{num}-virtual")
    return ";".join(archs)


def _ninja() -> str:
    try:  # the ninja wheel of the build environment
        import ninja

        path = Path(ninja.BIN_DIR) / "ninja"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    path = shutil.which("ninja")
    if not path:
        raise RuntimeError("ninja not found: pip install ninja")
    return path


def _cmake() -> str:
    try:
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        path = shutil.which("cmake")
        if not path:
            raise RuntimeError("cmake not found: pip install cmake")
        return path


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        outdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-DCMAKE_MAKE_PROGRAM={_ninja()}",  # pinned: a cached path may point at a deleted env
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFIMODA_OUTPUT_DIR={outdir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FIMODA_BUILD_TYPE', 'Release')}",
        ]
        cuda = os.environ.get("FIMODA_CUDA", "").strip()
        args.append("-DFIMODA_CUDA=" + {"0": "OFF", "1": "ON"}.get(cuda, "AUTO"))
        if os.environ.get("FIMODA_NATIVE") == "1":
            args.append("-DFIMODA_NATIVE=ON")
        archs = os.environ.get("CMAKE_CUDA_ARCHITECTURES") or _cuda_archs_from_torch_list(
            os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
        if archs:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        if not os.environ.get("CUDACXX") and not shutil.which("nvcc"):
            nvcc = Path("/usr/local/cuda/bin/nvcc")
            if nvcc.exists():
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        cmake = _cmake()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *args], check=True)
        build = [cmake, "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)

    def copy_extensions_to_source(self):
        # Editable installs copy only the module into the source tree; bring its metadata too.
        super().copy_extensions_to_source()
        built = Path(self.get_ext_fullpath("fimoda_kernels._C")).resolve().parent / "_build_info.json"
        if built.exists():
            shutil.copyfile(built, ROOT / "fimoda_kernels" / "_build_info.json")


setup(
    ext_modules=[Extension("fimoda_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
