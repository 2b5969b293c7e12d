"""A strict stand-in for a python stub's GPU memory: what the stub's torch caching allocator may hold (its cap) and
what TensorRT allocates beside it, each refused past its budget, as the real GPU would refuse.

Facts reproduced (no code copied):
- torch.cuda.set_per_process_memory_fraction(fraction, device) caps the caching allocator: "If trying to allocate
  more than the allowed value in a process, will raise an out of memory error in allocator" (PyTorch docs,
  torch.cuda.set_per_process_memory_fraction); pytorch/pytorch c10/cuda/CUDACachingAllocator.cpp keeps
  `allowed_memory_maximum` ("maximum amount of memory that device is allowed to allocate. This is set iff memory
  fraction is less than 1"), frees cached blocks and retries before it raises torch.OutOfMemoryError. Here the cap is
  checked against the bytes of live storages the stub allocated (a lower bound of what the real allocator reserves:
  it rounds blocks up and caches freed ones), so a stub refused here is refused on the GPU too.
- TensorRT's own device allocations (deserialized weights; a STATIC execution context's activation memory, allocated
  by ICudaEngine::createExecutionContext for the engine's largest profile: NVIDIA/TensorRT python/src/infer/pyCore.cpp,
  create_execution_context(strategy=ExecutionContextAllocationStrategy.STATIC)) do not go through torch: they are
  counted against `trt_budget` (the memory plan's TensorRT share of the process), and a context that cannot get its
  memory is None, as createExecutionContext returns nullptr.

CPU tensors stand in for CUDA ones: every tensor an op creates while the stand-in is active counts as the stub's
device memory (torch.utils._python_dispatch.TorchDispatchMode sees each op; a storage is new when no input of the op
shares it). Tensors made outside ops (torch.from_numpy, torch.from_dlpack: Triton's memory handed to the stub) are not
the stub's allocations and are not counted.

    with FakeCudaMemory(cap_bytes=...) as gpu:   # the stub's rendered cuda_memory_cap_bytes
        model.execute(requests)                   # torch.OutOfMemoryError past the cap
    gpu.peak, gpu.live
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ACTIVE: list["FakeCudaMemory"] = []  # the stand-ins in force (fakes.tensorrt charges TensorRT allocations here)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class FakeCudaMemory(TorchDispatchMode):
    def __init__(self, cap_bytes: int, trt_budget: int | None = None):
        super().__init__()
        self.cap, self.trt_budget = int(cap_bytes), trt_budget
        self.live = 0  # bytes of live torch storages allocated here
        self.peak = 0
        self.trt = 0  # bytes TensorRT holds beside torch
        self.refused: list[str] = []
        self._refs: dict[int, list] = {}  # storage key → [bytes, live tensors referencing it]
        self._lock = threading.Lock()

    # ---- torch ---------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, new=_storage_key(t) not in inputs)
        return out

    def _track(self, t: torch.Tensor, new: bool) -> None:
        key = _storage_key(t)
        with self._lock:
            ref = self._refs.get(key)
            if ref is None:
                if not new:
                    return  # a view of memory this stub did not allocate (a Triton input)
                size = t.untyped_storage().nbytes()
                if self.live + size > self.cap:
                    self.refused.append(f"{size} bytes with {self.live} of {self.cap} held")
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory (fakes.cuda_memory). Tried to allocate {size} bytes; {self.live} bytes "
                        f"are held and the process may hold {self.cap} (torch.cuda.set_per_process_memory_fraction)")
                ref = self._refs[key] = [size, 0]
                self.live += size
                self.peak = max(self.peak, self.live)
            ref[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        with self._lock:
            ref = self._refs.get(key)
            if ref is None:
                return
            ref[1] -= 1
            if ref[1] == 0:
                self.live -= ref[0]
                del self._refs[key]

    # ---- TensorRT (fakes.tensorrt calls these) ---------------------------------------------------------------
    def trt_allocate(self, size: int, what: str) -> bool:
        """False (nothing allocated) when TensorRT's share of the process cannot take `size` more bytes."""
        with self._lock:
            if self.trt_budget is not None and self.trt + size > self.trt_budget:
                self.refused.append(f"TensorRT {what}: {size} bytes with {self.trt} of {self.trt_budget} held")
                return False
            self.trt += size
            return True

    def __enter__(self):
        ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        ACTIVE.remove(self)
        return super().__exit__(*exc)


def trt_allocate(size: int, what: str) -> bool:
    """TensorRT asks for device memory outside torch: refused when a stand-in in force cannot give it."""
    return all(m.trt_allocate(size, what) for m in ACTIVE)
