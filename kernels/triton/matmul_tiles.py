"""Autotune config lists of the tensor-core matmul kernels (linear's, conv2d's), written once.

A tile is (outer0, outer1, reduction block, warps, stages): the output tile is outer0 x outer1 and
the loop steps over the reduction block; which BLOCK_* names those are depends on the kernel's
reduction block (BLOCK_K in a forward, BLOCK_N / BLOCK_M in the backward kernels).

Each launch may pick only from the list of its kernel, precision and epilogue on its target: the
op names the list (`list_name(kernel, named_args, kwargs)`), the autotuner's early_config_prune
keeps that list's tiles in order, and the target is the launch's device (target.py). A list is
the op's CONFIG_LISTS[name] (or its KERNEL_LISTS[(kernel, name)] override); on the A100 class
(sm_80), where mma.sync keeps the operands in registers, the tiles that spilled there are dropped
(sm80_spills) and clean ones added where too few were left (sm80_extra). A variant of a launch
(linear's fused dropout) is a list name with a suffix, its own spilling tiles dropped too. The
first tile of a list is its default: what runs under the interpreter (the whole list, whatever the
target) and with FASTDL_AUTOTUNE=0 (the target's list).
"""
import os
from typing import Callable

import triton

from . import target

_OUTER = {"BLOCK_K": ("BLOCK_M", "BLOCK_N"), "BLOCK_N": ("BLOCK_M", "BLOCK_K"), "BLOCK_M": ("BLOCK_N", "BLOCK_K")}


def first_config_only() -> bool:
    """Under the interpreter every trial config would run the whole kernel on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("FASTDL_AUTOTUNE", "1") == "0"


def without(tiles, *dropped) -> tuple:
    return tuple(t for t in tiles if t not in dropped)


class TileLists:
    """One op's matmul kernels and their tile lists.

    kernels: kernel name -> (its reduction block, the pointer whose dtype the dot's operands have);
    base_list_name(kernel, named_args, kwargs) -> the list's name without a variant suffix;
    variants: suffix -> (the launch's constexpr that selects it, spills, sm80 spills).
    """

    def __init__(self, kernels: dict, config_lists: dict, kernel_lists: dict, base_list_name: Callable,
                 sm80_spills: dict, sm80_extra: dict, variants: dict | None = None):
        self.kernels, self.config_lists, self.kernel_lists = kernels, config_lists, kernel_lists
        self.base_list_name = base_list_name
        self.sm80_spills, self.sm80_extra = sm80_spills, sm80_extra
        self.variants = variants or {}
        self.first_only = first_config_only()

    def list_name(self, kernel: str, named_args: dict, kwargs: dict) -> str:
        """The list a launch picks from (its variant's suffix appended when its constexpr is set)."""
        name = self.base_list_name(kernel, named_args, kwargs)
        for suffix, (flag, _, _) in self.variants.items():
            if kwargs.get(flag, False):
                name += suffix
        return name

    def config_tiles(self, kernel: str, name: str, capability: tuple[int, int] | None = None) -> tuple:
        """The tiles of list `name` for `kernel` on a GPU of `capability` (None: the whole list, what the
        interpreter runs), its default first."""
        variant = next((s for s in self.variants if name.endswith(s)), None)
        base = name.removesuffix(variant) if variant else name
        tiles = tuple(self.kernel_lists.get((kernel, base), self.config_lists[base]))
        sm80 = target.is_sm80_class(capability)
        if sm80:
            tiles = without(tiles, *self.sm80_spills.get((kernel, base), {}))
            tiles += tuple(t for t in self.sm80_extra.get((kernel, base), ()) if t not in tiles)
        if variant:
            _, spills, sm80_spills = self.variants[variant]
            tiles = without(tiles, *spills.get((kernel, base), {}))
            if sm80:
                tiles = without(tiles, *sm80_spills.get((kernel, base), {}))
        return tiles

    def config(self, kernel: str, tile) -> triton.Config:
        reduction = self.kernels[kernel][0]
        a, b, r, warps, stages = tile
        outer = _OUTER[reduction]
        return triton.Config({outer[0]: a, outer[1]: b, reduction: r, "GROUP": 8}, num_warps=warps,
                             num_stages=stages)

    def tile_of(self, config, kernel: str) -> tuple:
        reduction = self.kernels[kernel][0]
        outer = _OUTER[reduction]
        kw = config.kwargs
        return (kw[outer[0]], kw[outer[1]], kw[reduction], config.num_warps, config.num_stages)

    def all_configs(self, kernel: str) -> list:
        """Every tile of every list of `kernel` on any target, once each (the autotuner's `configs`; the
        prune picks a launch's list from them)."""
        tiles = []
        for name in self.config_lists:
            for capability in (None, (8, 0)):
                tiles += [t for t in self.config_tiles(kernel, name, capability) if t not in tiles]
        return [self.config(kernel, t) for t in tiles]

    def list_configs(self, kernel: str, name: str) -> list:
        """List `name` of `kernel` as triton.Configs, in order (for the tests that pin each config)."""
        return [self.config(kernel, t) for t in self.config_tiles(kernel, name)]

    def pruner(self, kernel: str):
        def early_config_prune(configs, named_args, **kwargs):
            """Autotuner.prune_configs: the configs of this launch's list, in the list's order; only the
            first of them where autotuning is off (the interpreter, FASTDL_AUTOTUNE=0)."""
            tiles = self.config_tiles(kernel, self.list_name(kernel, named_args, kwargs),
                                      target.capability(named_args[self.kernels[kernel][1]]))
            picked = [c for t in tiles for c in configs if self.tile_of(c, kernel) == t]
            if not picked:  # configs pinned by a test (or by hand) that no list holds: keep them
                return configs
            return picked[:1] if self.first_only else picked

        return early_config_prune

    def autotune(self, kernel: str, key: list, **kwargs):
        # What list_name reads besides the tensors' dtypes (INPUT_PRECISION, ACTIVATION, ...) must be in
        # every key: the prune runs once per key (the autotuner's cache key also holds each dtype).
        return triton.autotune(configs=self.all_configs(kernel), key=key,
                               prune_configs_by={"early_config_prune": self.pruner(kernel)}, **kwargs)
