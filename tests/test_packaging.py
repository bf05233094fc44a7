"""kernels/ ships as fastdl.kernels and never as a top-level `kernels` (a PyPI project owns that name)."""
import importlib.resources
import pathlib
import tomllib

import fastdl.kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_kernels_install_as_a_subpackage_only():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"fastdl.kernels": "kernels"}
    assert all(p == "fastdl" or p.startswith("fastdl.") for p in config["packages"])
    on_disk = {".".join(("fastdl",) + p.relative_to(ROOT).parent.parts)
               for p in ROOT.glob("kernels/**/__init__.py")}
    on_disk |= {".".join(("fastdl",) + p.relative_to(ROOT / "fastdl").parent.parts)
                for p in (ROOT / "fastdl").glob("**/__init__.py")}
    assert on_disk <= set(config["packages"]), "a package folder is missing from pyproject's list"
    assert config["package-data"]["fastdl.kernels.cuda"] == ["*.cu", "*.cuh"]


def test_installed_kernels_hold_both_languages():
    folder = pathlib.Path(fastdl.kernels.__file__).resolve().parent
    assert (folder / "triton" / "linear.py").is_file() and (folder / "cuda").is_dir()
    sources = [f.name for f in importlib.resources.files("fastdl.kernels.cuda").iterdir() if f.name.endswith(".cu")]
    assert "linear.cu" in sources
