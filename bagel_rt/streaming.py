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
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

CHUNK_BYTES = 64 << 20  # one pinned buffer; large tensors (embeddings, lm_head: 1 GiB) span many chunks
NUM_BUFFERS = 8  # 512 MiB of pinned host memory while loading
NUM_THREADS = 4  # host readers (a copy from the page cache runs at a few GB/s per thread)


def read_tensors(path, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], device: torch.device,
                 chunk_bytes: int = CHUNK_BYTES, num_buffers: int = NUM_BUFFERS,
                 num_threads: int = NUM_THREADS, progress=None) -> dict[str, Tensor]:
    """The tensors ``entries`` of the file at ``path`` on ``device``, in the file's dtypes.

    Args:
        entries: key -> (dtype, shape, absolute byte offset of the data in the file, nbytes).
        device: CUDA (pinned ring + copy stream) or CPU (the same chunked copies, synchronous; used by tests).
        progress: optional callable taking the bytes of each tensor once it is queued in full.
    Returns:
        key -> a new contiguous tensor on ``device`` (nothing refers to the file afterwards).
    """
    cuda = device.type == "cuda"
    out = {k: torch.empty(shape, dtype=dt, device=device) for k, (dt, shape, _, _) in entries.items()}
    # every (destination bytes, file offset, length) piece, in file order for sequential reads
    jobs = []
    for k, (_, _, off, n) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        dst = out[k].view(-1).view(torch.uint8) if n else None
        for s in range(0, n, chunk_bytes):
            m = min(chunk_bytes, n - s)
            jobs.append((dst[s:s + m], off + s, m, k if s + m == n else None, n))
    if not jobs:
        return out
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, writable: no read-only warning
    view = [torch.frombuffer(mm, dtype=torch.uint8)]  # the whole file as bytes (dropped before the unmap)
    buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(num_buffers)]
    done = [None] * num_buffers  # CUDA event of the last copy out of each buffer
    stream = torch.cuda.Stream(device) if cuda else None
    fills = deque()

    def fill(i):
        _, off, m, _, _ = jobs[i]
        buffers[i % num_buffers][:m].copy_(view[0][off:off + m])

    def submit(i):
        ev = done[i % num_buffers]
        if ev is not None:
            ev.synchronize()  # the buffer's previous chunk has reached the GPU
        fills.append(pool.submit(fill, i))

    try:
        with ThreadPoolExecutor(num_threads) as pool:
            ahead = num_buffers - 1  # keep the buffer of the copy just issued out of the next fill
            for i in range(min(ahead, len(jobs))):
                submit(i)
            for i, (dst, _, m, last_of, n) in enumerate(jobs):
                fills.popleft().result()
                buf = buffers[i % num_buffers]
                if cuda:
                    with torch.cuda.stream(stream):
                        dst.copy_(buf[:m], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(stream)
                    done[i % num_buffers] = ev
                else:
                    dst.copy_(buf[:m])
                if i + ahead < len(jobs):
                    submit(i + ahead)
                if last_of is not None and progress is not None:
                    progress(n)
        if cuda:
            stream.synchronize()
    finally:
        view.clear()
        mm.close()
    return out
