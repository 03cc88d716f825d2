"""Kernel launches and CUDA graphs of the decode step: capture once per batch size, then replay.

Every kernel of the backend is loaded by `_fn` and launched through a Kernel, which follows
the backend's Recorder. A decode step of the CUDA backend is a few hundred kernel launches;
from Python each costs microseconds, a graph replay about one per kernel. The forward pass
stays the one in model/forward.py: the backend runs it in one of three modes of its Recorder:

    eager     kernels launch as they are called (prefill, warm-up, retrieval policies)
    capture   on a GPU the launches go into a CUDA graph (cupy stream capture, buffers from a
              pool private to the graph); on the CPU shim they are recorded and run by _launch()
    replay    the forward pass runs for its host side only: KV bookkeeping and the host inputs
              of the step (token ids, positions, cache addresses, rows and spans), written into
              the graph's own staging buffers; every kernel call is checked to be the very launch
              that was captured (name, grid, block, pointers, scalars) and not run; then the
              graph runs.

What may change between steps is therefore data read by the kernels from device memory
(uploaded from the staging buffers by copies inside the graph), never a launch argument:
the KV append and the decode attention read their caches' addresses, rows and spans from
tables, and the flash-decoding grid is fixed by the context size. A check that fails
(GraphMismatch) means the step is not the captured one: the caller rolls back and runs it
eagerly, and the graph is dropped.
"""
from __future__ import annotations

import numpy as np


class GraphMismatch(RuntimeError):
    """A replayed step would not launch what the graph captured."""


class StepGraph:
    """One captured step: its launch signatures, allocations, uploads and output."""

    def __init__(self, key):
        self.key = key
        self.sigs: list = []        # (kernel, grid, block, smem, argument signature) in order
        self.ops: list = []         # shim: ("k", fn, grid, block, args, smem) | ("copy", host, dev)
        self.allocs: list = []      # the step's device arrays, in allocation order
        self.uploads: list = []     # (host staging, device) of every host input, in order
        self.output = None          # the array the step hands to to_host (the logits)
        self.graph = None           # cupy.cuda.graph.Graph (GPU)
        self.stream = None
        self.pool = None            # the memory pool the graph's buffers live in (GPU)
        self.replays = 0


class Recorder:
    """The backend's graph mode and the cursor of a replay pass."""

    def __init__(self):
        self.mode: str | None = None
        self.g: StepGraph | None = None
        self.max_keys = 0
        self.ik = self.ia = self.iu = 0

    def begin(self, mode: str, g: StepGraph, max_keys: int) -> None:
        self.mode, self.g, self.max_keys = mode, g, int(max_keys)
        self.ik = self.ia = self.iu = 0

    def end(self) -> None:
        if self.mode == "replay" and self.g is not None and \
                (self.ik, self.ia, self.iu) != (len(self.g.sigs), len(self.g.allocs), len(self.g.uploads)):
            self.mode = None
            raise GraphMismatch(f"replay issued {self.ik}/{self.ia}/{self.iu} launches/buffers/"
                                f"inputs, the graph holds {len(self.g.sigs)}/{len(self.g.allocs)}/"
                                f"{len(self.g.uploads)}")
        self.mode, self.g = None, None

    # -- the three things a replay pass checks ----------------------------------------------
    def kernel(self, sig) -> None:
        i = self.ik
        self.ik += 1
        if i >= len(self.g.sigs) or self.g.sigs[i] != sig:
            want = self.g.sigs[i][0] if i < len(self.g.sigs) else "nothing"
            raise GraphMismatch(f"launch {i}: {sig[0]} differs from the captured {want}")

    def alloc(self, shape, dtype):
        i = self.ia
        self.ia += 1
        a = self.g.allocs[i] if i < len(self.g.allocs) else None
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(x) for x in shape)
        if a is None or tuple(a.shape) != shape or a.dtype != np.dtype(dtype):
            raise GraphMismatch(f"buffer {i} {tuple(shape)} {np.dtype(dtype)} differs from the "
                                f"captured {None if a is None else (tuple(a.shape), a.dtype)}")
        return a

    def upload(self, a: np.ndarray):
        i = self.iu
        self.iu += 1
        host, dev = self.g.uploads[i] if i < len(self.g.uploads) else (None, None)
        if host is None or host.shape != a.shape or host.dtype != a.dtype:
            raise GraphMismatch(f"input {i} {a.shape} {a.dtype} differs from the captured one")
        host[...] = a
        return dev


def arg_signature(a, ptr):
    """What a kernel argument contributes to a launch signature: an array its address (its
    shape and dtype are the recorded buffer's, checked when it was handed out), a scalar its
    type and value."""
    if isinstance(a, np.generic):
        return (type(a), a)
    return ptr(a)


class Kernel:
    """A RawKernel (or shim kernel) behind the backend's graph recorder: launched eagerly,
    captured into a graph, or (replay pass) checked against the captured launch."""

    def __init__(self, B, name: str, fn):
        self.B, self.name, self.fn = B, name, fn

    @property
    def max_dynamic_shared_size_bytes(self):
        # (a shim kernel has no such attribute: no limit to raise)
        return getattr(self.fn, "max_dynamic_shared_size_bytes", 0)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, v):
        self.fn.max_dynamic_shared_size_bytes = v

    def __call__(self, grid, block, args, shared_mem: int = 0):
        rec = self.B._rec
        if rec.mode is None:
            return self.fn(grid, block, args, shared_mem=shared_mem)
        ptr = self.B._ptr
        sig = (self.name, grid, block, shared_mem, tuple(arg_signature(a, ptr) for a in args))
        if rec.mode == "replay":
            rec.kernel(sig)                   # the graph launches it
            return None
        rec.g.sigs.append(sig)
        if self.B.on_gpu:
            return self.fn(grid, block, args, shared_mem=shared_mem)   # into the stream's graph
        rec.g.ops.append(("k", self.fn, grid, block, args, shared_mem))


class Graphs:
    """The CUDA backend's part that loads kernels and runs decode steps as CUDA graphs."""

    def _init_graphs(self, loader, graphs: bool) -> None:
        self.loader = loader
        self.graphs = bool(graphs)
        self._mods: dict = {}
        self._fns: dict = {}
        self._rec = Recorder()
        self._graphs: dict = {}             # key -> StepGraph
        self._warm: set = set()             # keys run eagerly once (kernels compiled, tables built)

    def _fn(self, module: str, kernel: str) -> Kernel:
        """Kernel `kernel` of kernels/<module>.cu (the module compiled on first use)."""
        key = (module, kernel)
        f = self._fns.get(key)
        if f is None:
            if module not in self._mods:
                self._mods[module] = self.loader(module)
            f = self._fns[key] = Kernel(self, f"{module}.{kernel}",
                                        self._mods[module].get_function(kernel))
        return f

    def graph_step(self, key, run, max_keys: int, rollback=None):
        """run() (a decode step's forward pass, returning to_host(logits)) as a CUDA graph:
        eagerly the first time a key is seen (kernels compiled, constant tables made), captured
        the second, replayed after. max_keys: the longest context any sequence can reach (the
        flash-decoding grid). rollback(): undo the host bookkeeping of an aborted replay pass
        (the step then runs eagerly). Returns the host logits."""
        if not self.graphs:
            return run()
        g = self._graphs.get(key)
        if g is None:
            if key not in self._warm:
                self._warm.add(key)
                return run()
            return self._capture(key, run, max_keys)
        self._rec.begin("replay", g, max_keys)
        try:
            run()
            self._rec.end()
        except GraphMismatch:
            self._rec.mode = None
            del self._graphs[key]
            if rollback is not None:
                rollback()
            return run()
        except BaseException:
            self._rec.mode = None
            raise
        self._launch(g)
        g.replays += 1
        return self.to_host(g.output)

    def _capture(self, key, run, max_keys: int):
        g = StepGraph(key)
        self._rec.begin("capture", g, max_keys)
        try:
            if self.on_gpu:
                import cupy
                g.pool, g.stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream()
                with cupy.cuda.using_allocator(g.pool.malloc), g.stream:
                    g.stream.begin_capture()
                    try:
                        run()
                    finally:
                        g.graph = g.stream.end_capture()
            else:
                run()
        finally:
            self._rec.mode, self._rec.g = None, None
        self._graphs[key] = g
        self._launch(g)
        return self.to_host(g.output)

    def _launch(self, g: StepGraph) -> None:
        if self.on_gpu:
            g.graph.launch(g.stream)
            return
        for op in g.ops:        # the shim's graph: the recorded copies and launches, in order
            if op[0] == "copy":
                op[2][...] = op[1]
            else:
                op[1](op[2], op[3], op[4], shared_mem=op[5])
