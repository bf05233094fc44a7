"""Read a cubin: resource usage and SASS instruction counts, with the CUDA tools in Triton's wheel
(cuobjdump; knobs.nvidia.cuobjdump finds it, TRITON_CUOBJDUMP_PATH overrides), and occupancy.

    usage = read_cubin(cubin_bytes)       # {function name: FunctionStats}
    occupancy(stats.registers, shared_bytes, warps, "sm_90")
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Device:
    """Per-SM limits of the GPU a target is inspected for."""
    name: str
    sms: int
    registers: int = 65536           # 32-bit registers per SM
    max_warps: int = 64
    max_blocks: int = 32
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024  # the most one block may ask for (opt-in)
    reserved_shared_per_block: int = 1024  # the CUDA runtime's own, per resident block (sm_80+)
    register_unit: int = 256         # registers are allocated per warp in units of this many


DEVICES = {
    "sm_90": Device("H100/H200", sms=132),
    "sm_80": Device("A100", sms=108, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
}


@dataclass
class FunctionStats:
    registers: int = 0
    stack: int = 0          # bytes of local memory per thread: spills (Triton kernels have no local arrays)
    static_shared: int = 0
    local: int = 0
    spill_stores: int = 0   # STL instructions
    spill_loads: int = 0    # LDL instructions
    mma: int = 0            # HGMMA (sm_90 warpgroup), HMMA (fp16/bf16/tf32 mma.sync), DMMA (fp64)
    mma_ops: dict = field(default_factory=dict)
    async_copies: int = 0   # LDGSTS (cp.async), UTMALDG / UBLKCP (TMA, cp.async.bulk)
    async_copy_bits: dict = field(default_factory=dict)  # LDGSTS per width in bits
    global_loads: int = 0
    global_loads_128: int = 0
    global_load_bits: dict = field(default_factory=dict)
    global_stores: int = 0
    global_stores_128: int = 0
    global_store_bits: dict = field(default_factory=dict)
    asserts: int = 0        # calls to __assertfail (device-side assert sites: CALL.ABS)
    traps: int = 0          # BPT.TRAP
    instructions: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _run(tool: str, *args: str) -> str:
    return subprocess.run([_tool(tool), *args], check=True, capture_output=True, text=True).stdout


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.MULTILINE)
_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def width_bits(opcode: str) -> int:
    """Access width of a load/store/copy opcode from its modifiers: LDG.E.128 -> 128, LDG.E.U16 -> 16."""
    parts = opcode.split(".")[1:]
    for bits in ("128", "64"):
        if bits in parts:
            return int(bits)
    if any(p in ("U8", "S8") for p in parts):
        return 8
    if any(p in ("U16", "S16") for p in parts):
        return 16
    return 32


def count_instructions(sass: str, stats: FunctionStats) -> FunctionStats:
    """Fill the instruction counts of `stats` from one function's SASS text."""
    def bump(table, key):
        table[str(key)] = table.get(str(key), 0) + 1

    for opcode, operands in _INSTRUCTION.findall(sass):
        stats.instructions += 1
        base = opcode.split(".")[0]
        if base in ("HGMMA", "HMMA", "DMMA", "IMMA", "UTCHMMA", "UTCQMMA"):
            stats.mma += 1
            bump(stats.mma_ops, base)
        elif base == "LDGSTS":
            stats.async_copies += 1
            bump(stats.async_copy_bits, width_bits(opcode))
        elif base in ("UTMALDG", "UBLKCP"):
            stats.async_copies += 1
        elif base == "LDG":
            stats.global_loads += 1
            stats.global_loads_128 += width_bits(opcode) == 128
            bump(stats.global_load_bits, width_bits(opcode))
        elif base in ("STG", "RED", "ATOMG"):
            stats.global_stores += 1
            stats.global_stores_128 += width_bits(opcode) == 128
            bump(stats.global_store_bits, width_bits(opcode))
        elif base == "STL":
            stats.spill_stores += 1
        elif base == "LDL":
            stats.spill_loads += 1
        elif base == "BPT" and "TRAP" in opcode:
            stats.traps += 1
        elif base == "CALL" and ("assertfail" in operands or ".ABS" in opcode):
            # The cubin calls __assertfail through an absolute, relocated address (CALL.ABS.NOINC R2);
            # a kernel calls no other external function (no printf in fastdl's kernels).
            stats.asserts += 1
    return stats


def read_cubin(cubin: bytes) -> dict[str, FunctionStats]:
    """{function name: FunctionStats} of every function in a cubin.

    cuobjdump takes ~0.5 s a call, more than a compile found in triton's cache, so the result is
    kept by the cubin's hash under triton's cache directory (knobs.cache.dir, TRITON_CACHE_DIR)."""
    from triton import knobs

    cache = Path(knobs.cache.dir) / "fastdl-inspect" / f"{hashlib.sha256(cubin).hexdigest()}.json"
    if cache.is_file():
        return {name: FunctionStats(**fields) for name, fields in json.loads(cache.read_text()).items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = _run("cuobjdump", "-res-usage", "-sass", str(path))
    stats = {name: FunctionStats(registers=int(reg), stack=int(stack), static_shared=int(shared), local=int(local))
             for name, reg, stack, shared, local in _RESOURCES.findall(text)}
    headers = list(_FUNCTION.finditer(text))
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        count_instructions(text[header.end():end], stats.setdefault(header.group(1), FunctionStats()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({name: s.as_dict() for name, s in stats.items()}))
    partial.replace(cache)  # atomic: parallel workers may write the same entry
    return stats


def occupancy(registers: int, shared: int, warps: int, arch: str) -> dict:
    """Resident blocks and warps per SM, and which limit binds (registers, shared, warps, blocks)."""
    device = DEVICES[arch]
    per_warp = -(-max(registers, 1) * 32 // device.register_unit) * device.register_unit
    limits = {
        "registers": (device.registers // per_warp) // warps,
        "shared": device.shared_per_sm // (shared + device.reserved_shared_per_block),
        "warps": device.max_warps // warps,
        "blocks": device.max_blocks,
    }
    if shared > device.shared_per_block:
        limits["shared"] = 0
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "limited_by": min(limits, key=limits.get)}


def instantiation_stats(stem: str, arch: str) -> dict[str, FunctionStats]:
    """{name expression: FunctionStats} of kernels/cuda/<stem>.cu's instantiations compiled by NVRTC
    for `arch` (through fastdl.nvrtc's cache); raises with NVRTC's log if the module does not compile."""
    from fastdl import nvrtc

    source = next(p for p in nvrtc.cuda_sources() if p.stem == stem)
    result = nvrtc.compile_cubin(source, arch)
    if not result.ok:
        raise RuntimeError(f"NVRTC could not compile {source.name} for {arch}:\n{result.log}")
    stats = read_cubin(result.cubin)
    return {expression: stats[name] for expression, name in result.lowered.items()}
