"""Compile fastdl's CUDA sources with NVRTC, on a machine with or without a GPU.

NVRTC compiles for any architecture without a device, so CPU CI proves that every
kernels/cuda/*.cu compiles for sm_80 and sm_90 as the cupy backend compiles it: its options and
its template instantiations (name expressions), against the CUDA headers found here (the
nvidia-cuda-runtime wheel, CUDA_PATH / CUDA_HOME, /usr/local/cuda) that best match this NVRTC.

    ok, log = compile_source(path, "sm_90")
    compiled = compile_cubin(path, "sm_90")    # .cubin and .lowered too (fastdl inspect reads them)

A compile is kept on disk under FASTDL_NVRTC_CACHE (a folder; unset: no cache), keyed by the
whole source text, the name expressions, the options, the arch and the NVRTC version: the test
suite, `fastdl verify` and `fastdl inspect` compile the same modules for the same targets, and a
module such as conv2d.cu takes about a minute per target on two cores. .ci/run sets it.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Options shared with fastdl.backends.cupy. No fast-math: erf, tanh and exp must match torch.
OPTIONS = ("--std=c++17",)

_INSTALL_HINT = "pip install -e .[test] (or pip install cuda-bindings nvidia-cuda-nvrtc nvidia-cuda-runtime)"


def cuda_sources() -> list[Path]:
    """kernels/cuda/*.cu as installed (the package fastdl.kernels.cuda), sorted by name."""
    root = importlib.resources.files("fastdl.kernels.cuda")
    return sorted((Path(str(p)) for p in root.iterdir() if p.name.endswith(".cu")), key=lambda p: p.name)


def read_source(stem: str) -> str:
    """The text of kernels/cuda/<stem>.cu."""
    return importlib.resources.files("fastdl.kernels.cuda").joinpath(f"{stem}.cu").read_text()


def preludes(stem: str) -> tuple[str, ...]:
    """The stems compiled before kernels/cuda/<stem>.cu in its module (fastdl.backends.cupy.SOURCE_PRELUDES)."""
    from fastdl.backends import cupy as _cupy_backend  # imports no cupy at module level

    return tuple(_cupy_backend.SOURCE_PRELUDES.get(stem, ()))


_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"[ \t]*$', re.M)


def _expand(name: str, text: str, read, included: set[str]) -> str:
    """text with each #include "<header>.cuh" replaced by the header's text (read(name) gives it),
    once per module; #line keeps every file's own line numbers in compiler messages."""
    def header(match):
        header_name = match.group(1)
        if header_name in included:
            return ""
        included.add(header_name)
        body = _expand(header_name, read(header_name).replace("#pragma once\n", "", 1), read, included)
        line = text.count("\n", 0, match.end()) + 2
        return f'#line 1 "{header_name}"\n{body}\n#line {line} "{name}"'

    return _INCLUDE.sub(header, text)


def _join(parts: list[tuple[str, str]], read=None) -> str:
    """(file name, text) pairs as one translation unit, their .cuh includes inlined (NVRTC, CuPy
    and the host emulation see one text, no include path); #line keeps each file's own line numbers."""
    read = read or (lambda header: importlib.resources.files("fastdl.kernels.cuda").joinpath(header).read_text())
    included: set[str] = set()
    parts = [(name, _expand(name, text, read, included)) for name, text in parts]
    return "".join(f'#line 1 "{name}"\n{text}\n' for name, text in parts) if len(parts) > 1 else parts[0][1]


def module_source(stem: str) -> str:
    """What the cupy backend compiles for kernels/cuda/<stem>.cu: its preludes, then the file."""
    return _join([(f"{s}.cu", read_source(s)) for s in (*preludes(stem), stem)])


def instantiations(stem: str) -> tuple[str, ...]:
    """The template instantiations the cupy backend asks of kernels/cuda/<stem>.cu."""
    from fastdl.backends import cupy as _cupy_backend  # imports no cupy at module level

    return tuple(_cupy_backend.NAME_EXPRESSIONS.get(stem, ()))


def _cudart_version(include_dir: Path) -> int | None:
    """CUDART_VERSION (e.g. 12080) of a header directory, or None if it has no CUDA headers."""
    header = include_dir / "cuda_runtime_api.h"
    if not (include_dir / "cuda_fp16.h").is_file() or not header.is_file():
        return None
    match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", header.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def _candidate_include_dirs() -> list[Path]:
    dirs: list[Path] = []
    try:  # cuda-pathfinder (a dependency of cuda-bindings) knows the wheel and conda layouts
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            dirs.append(Path(found))
    except Exception:  # noqa: BLE001 - an old or missing pathfinder is not an error here
        pass
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        # CUDA 13 wheels: nvidia/cu13/include; CUDA 12 wheels: nvidia/cuda_runtime/include.
        dirs += sorted(Path(base).glob("cu*/include")) + [Path(base) / "cuda_runtime" / "include"]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    unique = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def include_dirs(nvrtc_version: tuple[int, int] | None = None, same_major_only: bool = False) -> list[str]:
    """Directories holding cuda_fp16.h / cuda_bf16.h, the best match for `nvrtc_version` first.

    Headers of another CUDA major than the compiler's come last, and not at all with
    `same_major_only`: a newer cuda_bf16.h may use builtins an older NVRTC does not have.
    """
    found = [(d, v) for d in _candidate_include_dirs() if (v := _cudart_version(d)) is not None]
    if nvrtc_version is None:
        return [] if same_major_only else [str(d) for d, _ in found]
    major, minor = nvrtc_version
    wanted = major * 1000 + minor * 10
    if same_major_only:
        found = [(d, v) for d, v in found if v // 1000 == major]
    # Same major first; then the closest version, preferring one not newer than the compiler.
    found.sort(key=lambda dv: (dv[1] // 1000 != major, dv[1] > wanted, abs(dv[1] - wanted)))
    return [str(d) for d, _ in found]


def header_options(nvrtc_version: tuple[int, int] | None = None, same_major_only: bool = False) -> tuple[str, ...]:
    """-I for the best header directory for that NVRTC, or nothing if none qualifies."""
    return tuple(f"-I{d}" for d in include_dirs(nvrtc_version, same_major_only)[:1])


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise RuntimeError(f"fastdl.nvrtc needs cuda-bindings and the NVRTC wheel: {_INSTALL_HINT}") from exc
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    return int(major), int(minor)


def _check(nvrtc, result, what: str):
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, message = nvrtc.nvrtcGetErrorString(err)
        raise RuntimeError(f"NVRTC {what} failed: {message.decode(errors='replace')}")
    return rest[0] if len(rest) == 1 else rest


@dataclass
class Compiled:
    """An NVRTC compile: whether it succeeded, its log, the cubin, and each name expression's
    lowered (mangled) name, the function's name in the cubin."""
    ok: bool
    log: str
    cubin: bytes = b""
    lowered: dict[str, str] = field(default_factory=dict)


def compile_source(path_or_text, arch: str, name_expressions: tuple[str, ...] | None = None,
                   extra_options: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Compile a .cu (a path, or the source text) for `arch` ("sm_80", "sm_90") to CUBIN.

    Returns (ok, log). The template instantiations are those fastdl.backends.cupy uses for a
    source of that stem (or `name_expressions`), so templates are compiled, not just parsed; a
    path's preludes (the sources compiled before it, from the same folder) come first, as there.
    """
    result = compile_cubin(path_or_text, arch, name_expressions, extra_options)
    return result.ok, result.log


def compile_cubin(path_or_text, arch: str, name_expressions: tuple[str, ...] | None = None,
                  extra_options: tuple[str, ...] = ()) -> Compiled:
    """compile_source, keeping the cubin and the lowered names (for fastdl.inspection)."""
    nvrtc = _nvrtc()
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and "\n" not in path_or_text
                                          and path_or_text.endswith((".cu", ".cuh"))):
        path = Path(path_or_text)
        name = path.name
        text = _join([(f"{s}.cu", (path.parent / f"{s}.cu").read_text()) for s in preludes(path.stem)]
                     + [(name, path.read_text())], read=lambda header: (path.parent / header).read_text())
        if name_expressions is None:
            name_expressions = instantiations(path.stem)
    else:
        text, name = str(path_or_text), "source.cu"
    expressions = tuple(name_expressions or ())
    headers = header_options(nvrtc_version())
    options = [*OPTIONS, f"--gpu-architecture={arch}", *headers, *extra_options]

    key = _cache_key(text, name, expressions, options)
    cached = _cache_read(key)
    if cached is not None:
        return cached
    compiled = _compile(nvrtc, text, name, expressions, options, headers)
    _cache_write(key, compiled)
    return compiled


def _cache_dir() -> Path | None:
    folder = os.environ.get("FASTDL_NVRTC_CACHE")
    return Path(folder) if folder else None


def _cache_key(text: str, name: str, expressions: tuple[str, ...], options: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (text, name, "\0".join(expressions), "\0".join(options), repr(nvrtc_version())):
        digest.update(part.encode())
        digest.update(b"\1")
    return digest.hexdigest()


def _cache_read(key: str) -> Compiled | None:
    folder = _cache_dir()
    if folder is None:
        return None
    try:
        meta = json.loads((folder / f"{key}.json").read_text())
        cubin = (folder / f"{key}.cubin").read_bytes() if meta["ok"] else b""
    except (OSError, ValueError, KeyError):
        return None
    return Compiled(meta["ok"], meta["log"], cubin, meta["lowered"])


def _cache_write(key: str, compiled: Compiled) -> None:
    folder = _cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The cubin first, the metadata last, each renamed into place: a reader that finds the .json
        # finds its whole cubin, also while another process (a parallel test worker) writes the same key.
        tmp = folder / f"{key}.cubin.{os.getpid()}"
        tmp.write_bytes(compiled.cubin)
        tmp.replace(folder / f"{key}.cubin")
        tmp = folder / f"{key}.json.{os.getpid()}"
        tmp.write_text(json.dumps({"ok": compiled.ok, "log": compiled.log, "lowered": compiled.lowered}))
        tmp.replace(folder / f"{key}.json")
    except OSError:
        pass  # a cache that cannot be written is no cache


def _compile(nvrtc, text: str, name: str, expressions: tuple[str, ...], options: list[str], headers) -> Compiled:
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(text.encode(), name.encode(), 0, [], []), "create")
    try:
        for expression in expressions:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, expression.encode()), f"name expression {expression}")
        encoded = [o.encode() for o in options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        log_size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = b" " * log_size
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log), "log")
        log_text = log.rstrip(b"\x00 ").decode(errors="replace")
        ok = result == nvrtc.nvrtcResult.NVRTC_SUCCESS
        cubin, lowered = b"", {}
        if ok:
            missing = []
            for expression in expressions:
                err, name_bytes = nvrtc.nvrtcGetLoweredName(prog, expression.encode())
                if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or not name_bytes:
                    missing.append(expression)
                else:
                    lowered[expression] = name_bytes.decode() if isinstance(name_bytes, bytes) else str(name_bytes)
            if missing:
                ok = False
                log_text += f"\nname expressions not instantiated: {', '.join(missing)}"
            size = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
            buffer = b" " * size
            _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, buffer), "cubin")
            cubin = bytes(buffer)
        if not headers:
            log_text += "\n(no CUDA header directory found: install nvidia-cuda-runtime or set CUDA_PATH)"
        header = f"nvrtc {'.'.join(map(str, nvrtc_version()))} {' '.join(options)}"
        return Compiled(ok, f"{header}\n{log_text}".strip(), cubin, lowered)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
