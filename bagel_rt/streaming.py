"""Reading safetensors data onto a GPU with the file read and the host-to-device copy overlapped.

``safe_open(..., device="cuda")`` reads a tensor into pageable host memory and then copies it, one tensor at a
time, so the disk/page-cache read and the PCIe transfer never overlap: the 27.5 GiB BAGEL checkpoint took
9.4-9.9 s to load from the page cache on an H200 host that reads the same files in 4.5 s
(``benchmarks/load_time.py``). Here worker threads copy fixed-size chunks of the memory-mapped file into a ring
of pinned buffers while a CUDA stream copies the previous chunks to their destination tensors; a buffer is
refilled only after its copy has finished (a CUDA event per buffer).
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

CHUNK_BYTES = 64 << 20  # one pinned buffer; large tensors (embeddings, lm_head: 1 GiB) span many chunks
NUM_BUFFERS = 8  # 512 MiB of pinned host memory while loading
NUM_THREADS = 4  # host readers (a copy from the page cache runs at a few GB/s per thread)


def stream_tensors(path, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], device: torch.device,
                   chunk_bytes: int = CHUNK_BYTES, num_buffers: int = NUM_BUFFERS,
                   num_threads: int = NUM_THREADS, progress=None) -> Iterator[tuple[str, Tensor]]:
    """The tensors ``entries`` of the file at ``path``, one at a time in file order: (key, a new contiguous
    tensor on ``device`` in the file's dtype) as soon as the tensor's last chunk is queued, the ring kept busy
    meanwhile; nothing refers to the file afterwards.

    Args:
        entries: key -> (dtype, shape, absolute byte offset of the data in the file, nbytes).
        device: CUDA (pinned ring + copy stream) or CPU (the same chunked copies, synchronous; used by tests).
        progress: optional callable taking the bytes of each tensor once it is queued in full.

    What the caller does with a tensor on the current stream is ordered after its copy (the stream waits for
    the copy stream's event); each destination is allocated just before its first chunk, and the copy stream
    first waits for the current stream, so memory the caller has freed is never overwritten while its kernels
    may still read it. Tensors the caller drops are freed: at most the ring's bytes plus one tensor are in
    flight, which lets compressed and quantize-on-load checkpoints stream without staging the whole model.
    """
    cuda = device.type == "cuda"
    order = sorted(entries.items(), key=lambda kv: kv[1][2])  # file order: sequential reads
    # every (tensor index, byte offset inside it, file offset, length) piece
    jobs = [(j, s, off + s, min(chunk_bytes, n - s)) for j, (_, (_, _, off, n)) in enumerate(order)
            for s in range(0, n, chunk_bytes)]
    empty = [j for j, (_, (_, _, _, n)) in enumerate(order) if n == 0]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if jobs else None  # private, writable
    view = [torch.frombuffer(mm, dtype=torch.uint8)] if jobs else []  # the whole file (dropped before unmap)
    buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(min(num_buffers,
                                                                                                 len(jobs)))]
    nbuf = len(buffers)
    done = [None] * nbuf  # CUDA event of the last copy out of each buffer
    stream = torch.cuda.Stream(device) if cuda else None
    fills = deque()

    def fill(i):
        _, _, off, m = jobs[i]
        buffers[i % nbuf][:m].copy_(view[0][off:off + m])

    def submit(i):
        ev = done[i % nbuf]
        if ev is not None:
            ev.synchronize()  # the buffer's previous chunk has reached the GPU
        fills.append(pool.submit(fill, i))

    def new_tensor(j):
        key, (dt, shape, _, n) = order[j]
        t = torch.empty(shape, dtype=dt, device=device)
        if cuda:  # the copy stream writes it only after what the current stream queued before (see above)
            stream.wait_stream(torch.cuda.current_stream(device))
        return key, t, (t.view(-1).view(torch.uint8) if n else None)

    try:
        for j in empty:
            key, t, _ = new_tensor(j)
            yield key, t
        if not jobs:
            return
        with ThreadPoolExecutor(num_threads) as pool:
            ahead = max(nbuf - 1, 1)  # keep the buffer of the copy just issued out of the next fill
            # (with one buffer the next fill waits for that copy)
            for i in range(min(ahead, len(jobs))):
                submit(i)
            cur = None  # (key, tensor, its bytes) being filled
            for i, (j, s, _, m) in enumerate(jobs):
                fills.popleft().result()
                if s == 0:
                    cur = new_tensor(j)
                buf = buffers[i % nbuf]
                if cuda:
                    with torch.cuda.stream(stream):
                        cur[2][s:s + m].copy_(buf[:m], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(stream)
                    done[i % nbuf] = ev
                else:
                    cur[2][s:s + m].copy_(buf[:m])
                if i + ahead < len(jobs):
                    submit(i + ahead)
                n = order[j][1][3]
                if s + m == n:  # the tensor's last chunk is queued
                    if progress is not None:
                        progress(n)
                    if cuda:
                        torch.cuda.current_stream(device).wait_event(ev)
                    key, t, _ = cur
                    cur = None
                    yield key, t
    finally:
        if cuda and jobs:
            stream.synchronize()  # no copy may still target memory freed after this (or read a buffer)
        view.clear()
        if mm is not None:
            mm.close()
