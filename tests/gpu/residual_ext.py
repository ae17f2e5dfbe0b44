"""A vLLM worker extension for the residual probe (`--worker-extension-cls residual_ext.ResidualProbe`).

Its methods run inside the worker (EngineCore at TP=1), called through vLLM's /collective_rpc: what the
GPU memory left after vLLM's sleep is made of, and what freeing parts of it gives back. GPU suite only.
"""

from __future__ import annotations

import collections
import gc

MIB = 2**20


class ResidualProbe:
    def residual_report(self) -> dict:
        import torch

        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        report = {
            "device_used_mib": (total - free) // MIB,
            "torch_reserved_mib": torch.cuda.memory_reserved() // MIB,
            "torch_allocated_mib": torch.cuda.memory_allocated() // MIB,
            "torch_segments": stats.get("segment.all.current", 0),
            "torch_inactive_split_mib": stats.get("inactive_split_bytes.all.current", 0) // MIB,
        }
        try:
            from vllm.device_allocator.cumem import CuMemAllocator

            allocator = CuMemAllocator.get_instance()
            by_tag: dict[str, int] = collections.Counter()
            for data in allocator.pointer_to_data.values():
                by_tag[str(data.tag)] += int(data.handle[1])
            report["cumem_pool_mib_by_tag"] = {tag: size // MIB for tag, size in by_tag.items()}
        except Exception as error:  # the probe reports what it cannot read
            report["cumem_pool_error"] = repr(error)
        # Live CUDA tensors the garbage collector can reach, by owner kind (their storages, counted once).
        seen: set[int] = set()
        sizes: collections.Counter = collections.Counter()
        count: collections.Counter = collections.Counter()
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.is_cuda:
                    storage = obj.untyped_storage()
                    key = storage.data_ptr()
                    if key in seen or key == 0:
                        continue
                    seen.add(key)
                    kind = f"{tuple(obj.shape)[:3]} {obj.dtype}"
                    sizes[kind] += storage.nbytes()
                    count[kind] += 1
            except Exception:
                continue
        report["live_cuda_tensors_mib"] = sum(sizes.values()) // MIB
        report["live_cuda_tensors_top"] = [
            {"kind": kind, "mib": round(size / MIB, 1), "count": count[kind]} for kind, size in sizes.most_common(12)
        ]
        return report

    def residual_free(self, variant: str) -> dict:
        import torch

        gc.collect()
        if variant in ("empty_cache", "all"):
            torch.cuda.empty_cache()
        if variant in ("cublas", "all"):
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()
        torch.cuda.synchronize()
        return self.residual_report()
