"""Memory placement: keep on the GPU only what the current phase needs (``max_gpu_memory``).

BAGEL's parts are used in distinct phases: the ViT (+ connector and its position table) only while an input
image is prefilled, the VAE only to encode input images and decode the result, the token embedding only
for a handful of lookups per forward, ``lm_head`` only to decode text (answers, think text; never while an
image is denoised). Under a memory budget these live in CPU memory and visit the GPU only for their phase (the
embedding never does: its few rows are looked up on the CPU). Both LLM experts stay
resident: every denoising forward needs the generation expert for the latents *and* the understanding
expert for the two image-marker tokens, and streaming 6.5B parameters per step over PCIe would cost more
than the step.

The budget itself is enforced with ``torch.cuda.set_per_process_memory_fraction``; a request that does not
fit raises :class:`bagel_rt.errors.InputError` saying what was resident and what was asked.
"""

from __future__ import annotations

import gc
import math
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .errors import InputError
from .llm import ROW_ALIGN

GIB = 2**30


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _tensor_slots(module: nn.Module):
    """(owner module, name, is_parameter, tensor) of every parameter and buffer under ``module``; a tensor held
    by several modules (tied weights) appears once per holder, as the same object."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                yield m, name, True, p
        for name, b in m._buffers.items():
            if b is not None:
                yield m, name, False, b


def _set_slot(m: nn.Module, name: str, is_param: bool, t: torch.Tensor) -> None:
    if is_param:
        m._parameters[name].data = t  # the Parameter object stays (optimizers, tied weights, caches keyed by it)
    else:
        m._buffers[name] = t


def _device_copy(home: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """A visit's copy of a home tensor on ``device`` (from pinned memory it does not block the host)."""
    return home.to(device, non_blocking=non_blocking)


@contextmanager
def visiting(module: nn.Module, device: torch.device, enabled: bool):
    """``module`` on ``device`` for the ``with`` block, back home on the CPU afterwards (if enabled).

    A visit copies the CPU tensors (the home copies: pinned on their first visit to a CUDA device) to the device
    without blocking, and leaving points the module back at them: nothing is copied back, as inference never
    writes weights. ``module.to(device)`` there and ``module.to("cpu")`` back copied twice through pageable
    memory: the VAE's visit for each decode cost ~0.08 s of an FP8 t2i under a 15.5 GiB budget (H100, 1ff1e2e:
    its decode phase 0.284 s against 0.202 s uncapped), an edit's ViT, VAE encode and decode visits more."""
    if not enabled:
        yield module
        return
    slots = list(_tensor_slots(module))
    pin = device.type == "cuda"
    # by the id of the Parameter / buffer object (a tied one is seen once per holder): (its home, its copy)
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    homes = []
    try:
        for m, name, is_param, t in slots:
            if id(t) not in moved:
                home = t.data if is_param else t
                if home.device.type != "cpu":  # already resident (e.g. not offloaded): leave it where it is
                    continue
                if pin and not home.is_pinned():  # once: the home copy itself becomes pinned memory
                    home = home.pin_memory()
                moved[id(t)] = home, _device_copy(home, device, pin)
            home, copy = moved[id(t)]
            homes.append((m, name, is_param, home))
            _set_slot(m, name, is_param, copy)
        yield module
    finally:
        for m, name, is_param, home in homes:
            _set_slot(m, name, is_param, home)
        moved.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def phase_modules(model) -> list[nn.Module]:
    """The model parts that are only needed while an input image is prefilled (ViT path)."""
    return [model.vit_model, model.connector, model.vit_pos_embed]


def head_offloaded(bagel) -> bool:
    """Whether ``lm_head`` waits on the CPU between text phases: under a budget, unless its weights are a DF11
    unit kept compressed on the device (``df11_resident``: it decodes into the shared slots where it is)."""
    return bagel.offload and bagel.df11 is None


@contextmanager
def text_phase(bagel, embeddings: bool = False):
    """``lm_head`` on the model's device for one text-decoding phase (under a budget; a no-op otherwise), and
    with ``embeddings`` the token table too (the graph decoder looks each sampled token up on the device, inside
    its graph; prefill and the eager loop look tokens up where the table is).

    Idle while an image is denoised, lm_head takes 0.55 GB in INT8 / FP8 and ~0.29 GB in NF4 (1.09 GB bf16): on
    an H200 an INT8 edit under 16 GiB and an FP8 edit under 15.5 GiB ran out of memory by 112 MiB, the
    FP8-gen/NF4-und t2i under 12 GiB by 74 MiB, with it resident. Afterwards the graph decoder forgets what it
    built from them (its compressed ``DecodeWeight`` references the CUDA buffers, which would stay allocated, and
    its captured graphs bake their addresses; it rebuilds both on the next phase)."""
    head = head_offloaded(bagel)
    table = embeddings and bagel.offload
    device = bagel.model.device
    release_denoiser(bagel)
    with visiting(bagel.model.language_model.lm_head, device, head), \
            visiting(bagel.model.language_model.model.embed_tokens, device, table):
        try:
            yield
        finally:  # before the moves back, so that the CUDA buffers are freed with them
            if (head or table) and bagel._decoder is not None:
                bagel._decoder.release_head()


def limit_gpu_memory(bagel, gib: float) -> dict:
    """Place ``bagel`` for a GPU budget of ``gib`` GiB and cap the process at it.

    Returns what is resident. Raises :class:`InputError` when the resident weights alone exceed the budget.
    """
    device = bagel.device
    if device.type != "cuda":
        raise InputError("max_gpu_memory applies to CUDA devices only")
    model = bagel.model
    bagel.fast_cache.clear()
    expandable = expandable_segments()
    if bagel.df11 is not None:  # units of modules that move to the CPU are decoded for good first
        for prefix in ("language_model.model.embed_tokens", "vit_model"):
            bagel.df11.keep_decoded_under(prefix)
    emb = model.language_model.model.embed_tokens
    emb.to("cpu")
    for m in phase_modules(model):
        m.to("cpu")
    bagel.vae.to("cpu")
    bagel.offload = True
    bagel.graphs_refused = False  # a new budget: captures may fit again
    offloaded = ["embed_tokens", "vit_model", "connector", "vit_pos_embed", "vae"]
    if head_offloaded(bagel):  # text phases bring it back (:func:`text_phase`)
        model.language_model.lm_head.to("cpu")
        offloaded.append("lm_head")
    bagel._decoder = None  # a decoder built before holds lm_head's CUDA buffers, its static cache and graphs
    torch.cuda.empty_cache()
    # DF11 modules read weights the store decodes into its own buffers: their tensors must stay where they are
    compacted = compact(bagel) if expandable and bagel.df11 is None else None
    resident = torch.cuda.memory_allocated(device) / GIB
    stranded = held_bytes(device)
    if stranded > STRANDED_BYTES:
        warnings.warn(f"{stranded / GIB:.2f} GiB of GPU memory stay reserved in allocator segments partly in use "
                      f"(allocated before the budget was set); the {gib:g} GiB budget counts them. Pass "
                      "max_gpu_memory to bagel_rt.load (--max-gpu-memory) so that it applies from the first "
                      "allocation", RuntimeWarning, stacklevel=3)
    if resident > gib:
        smaller = ("df11_form='huffman' (DF11 kept in its own, ~7 % smaller form, decoded slower) or "
                   if bagel.df11 is not None and bagel.df11.form == "exp4" else "")
        raise InputError(f"the resident weights need {resident:.2f} GiB of GPU memory, more than the "
                         f"max_gpu_memory budget of {gib:g} GiB (try {smaller}nf4 weights)")
    decoded = keep_layers_decoded(bagel, gib * GIB) if bagel.df11 is not None else 0
    lean_modules(bagel, gib * GIB)
    resident = torch.cuda.memory_allocated(device) / GIB
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total), device)
    bagel.gpu_budget_gib = gib
    out = {"resident_gib": round(resident, 2), "budget_gib": gib,
           "offloaded": offloaded}
    if bagel.df11 is not None:
        out["df11_layers_decoded"] = decoded
    out["expandable_segments"] = expandable
    if compacted is not None:
        out["compacted_mib"] = round(compacted / 2**20)
    return out


#: reserved-but-unused memory (bytes) in the allocator's segments above which :func:`compact` moves the
#: resident weights (holes left where weights were replaced on the GPU, e.g. quantized there from bf16: segments
#: partly in use cannot be released). Measured on the H200 (d483d83): the random-weight INT8 model released
#: 101 MiB this way; the INT8 edit under 16 GiB still failed — in the denoiser's graph capture, which cannot
#: free the 1.4 GiB the default pool then caches (see ``PackedDenoiser._refuse_graphs``).
STRANDED_BYTES = 256 * 2**20


def held_bytes(device: torch.device) -> int:
    """Bytes the caching allocator holds reserved but unallocated on ``device`` (a cap counts them)."""
    return torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def compact(bagel) -> int | None:
    """Move the model's resident tensors into the expandable segment when the allocator's old segments hold more
    than :data:`STRANDED_BYTES` it cannot release; returns the bytes of reservation released (None: not needed).
    Caches holding the old tensors (captured denoisers, the text decoder) must be dropped before."""
    device = bagel.device
    held = held_bytes(device)
    if held <= STRANDED_BYTES:
        return None
    reallocate(bagel.model, device)
    gc.collect()
    torch.cuda.empty_cache()
    return max(0, held - held_bytes(device))


def reallocate(module: torch.nn.Module, device: torch.device) -> None:
    """Copy every parameter and buffer of ``module`` on ``device`` into new memory, in place (the Parameters
    stay the same objects). Tensors sharing a storage keep sharing one (views stay views): one copy per storage,
    so the resident bytes do not grow."""
    copies: dict[int, torch.UntypedStorage] = {}

    def moved(t: torch.Tensor) -> torch.Tensor:
        if t.device != device:
            return t
        s = t.untyped_storage()
        if s.data_ptr() not in copies:
            copies[s.data_ptr()] = s.clone()
        return torch.empty(0, dtype=t.dtype, device=device).set_(copies[s.data_ptr()], t.storage_offset(),
                                                                 t.size(), t.stride())

    module._apply(moved)


def expandable_segments() -> bool:
    """Switch the caching allocator to expandable segments (process-wide); returns whether it took.

    Under a cap, what the allocator holds but cannot reuse counts against the budget: on the H200 (ac07312) an
    INT8 edit under 16 GiB failed with 15.59 GiB allocated, the FP8-gen/NF4-und recipe's t2i under 12 GiB with
    10.83 GiB and DF11 under 24 GiB with 21.85 GiB — each time with the capped reservation full of blocks of
    freed sizes that no new request fitted. Expandable segments grow one mapped address range instead, so
    freed memory is reused whatever the sizes."""
    # torch >= 2.9 takes the setting device-generically (the CUDA spelling warns there as deprecated)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    try:
        setter("expandable_segments:True")
    except (TypeError, RuntimeError):  # a torch without the setting: the budget still applies
        return False
    return True


def lean_modules(bagel, budget_bytes: float) -> None:
    """Under a budget: the LLM's MLPs prefill in row chunks (:func:`prefill_mlp_rows`), and NF4 Linears
    multiply a few rows (the denoiser's image-marker rows) with the fused GEMM instead of materialising the
    dequantized weight (130 MiB per MLP weight at full size)."""
    from .quant import NF4Linear

    model = bagel.model
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.lean = True
    rows = prefill_mlp_rows(bagel, budget_bytes)
    for layer in model.language_model.model.layers:
        layer.mlp.max_rows = layer.mlp_moe_gen.max_rows = rows


#: the share of the memory a budget leaves above the resident weights that the MLP intermediates of one row
#: chunk may take (prefill and denoiser alike): a quarter leaves room for the KV caches, the denoiser's arena and
#: the rest of the activations
MLP_SHARE = 0.25
#: fewest row chunks of the denoiser's MLPs under a budget (the setting of the measured budget runs)
MIN_MLP_CHUNKS = 4
#: most row chunks :func:`mlp_chunks` looks at for a forward that fits beside the arena: the 12 GB recipe's edit
#: (FP8 gen, NF4 und) ran out of memory at 11.79 GiB allocated with the share rule's 4 (H100, 1382226); its
#: residual streams (~0.5 GiB at 1024^2) do not shrink with more, and 16 chunks of an edit keep 768 rows each
MAX_MLP_CHUNKS = 16
#: fewest row chunks where they let the denoiser stay through the VAE decode (:func:`mlp_chunks`): with one, the
#: graph pool of an FP8 t2i under 15.5 GiB held so much that the decode ran out of memory beside it (H100, b5a3a77)
MIN_KEPT_CHUNKS = 2


def _mlp_row_bytes(bagel) -> int:
    """Bytes per row of an MLP's live intermediates: gate, up and their SwiGLU, [rows, intermediate] each."""
    p = bagel.model.params.llm
    return 3 * p.intermediate_size * bagel.model.dtype.itemsize


def _headroom(bagel, budget_bytes: float | None = None) -> float | None:
    """Bytes the budget leaves above what is allocated now (None without a CUDA budget)."""
    budget = budget_bytes if budget_bytes is not None else (
        bagel.gpu_budget_gib * GIB if bagel.gpu_budget_gib is not None else None)
    if budget is None or bagel.device.type != "cuda":
        return None
    return max(0.0, budget - torch.cuda.memory_allocated(bagel.device))


def prefill_mlp_rows(bagel, budget_bytes: float) -> int | None:
    """Rows per chunk of the prefill MLPs under a budget of ``budget_bytes`` (None without a CUDA budget):
    computed from sizes when the budget is set, so that a chunk's intermediates take at most :data:`MLP_SHARE`
    of the headroom above the resident weights (a multiple of ``ROW_ALIGN`` rows; :class:`bagel_rt.llm.MLP`).
    An edit's ViT block at 1024^2 has 4902 rows: unchunked, its gate/up/SwiGLU are 3 x 177 MiB."""
    free = _headroom(bagel, budget_bytes)
    if free is None:
        return None
    rows = int(MLP_SHARE * free) // (2 * _mlp_row_bytes(bagel))  # the last chunk takes up to twice the rows
    return max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN)


def mlp_chunks(bagel, rows: int, arena_bytes: int = 0, decode_bytes: int = 0) -> int:
    """Row chunks of the packed denoiser's MLPs for a forward of ``rows`` latent rows (all branches) over an arena
    of ``arena_bytes`` (the branches' caches and query blocks, :func:`bagel_rt.fast.arena_bytes`), followed by a
    VAE decode of ``decode_bytes``
    (:func:`bagel_rt.memory_plan.vae_decode_bytes`): 1 without a budget. Under one, the fewest (at least
    :data:`MIN_KEPT_CHUNKS`) with which the denoiser can stay through that decode — its arena, the graph pool's one
    forward of activations (:func:`bagel_rt.memory_plan.denoise_activation_bytes`) and the decode within the
    budget, less :data:`VAE_SLACK`, as :func:`vae_fits` asks afterwards — so the next request replays its graphs;
    where no count allows that, the fewest (from :data:`MIN_KEPT_CHUNKS` again, up to :data:`MAX_MLP_CHUNKS`) whose
    forward fits beside the arena with :data:`DENOISE_SLACK` to spare (the denoiser is then released before the
    decode); where none does, enough that a chunk's intermediates take at most :data:`MLP_SHARE` of the headroom,
    and at least :data:`MIN_MLP_CHUNKS`. A denoiser kept from the last request counts as free (the next one reuses
    or replaces it), so repeated requests of one layout get the same count.

    An FP8 t2i under 15.5 GiB, one process each (``budget_memory.py --runs fp8@15.5:t2i+chunksN``): H100,
    b5a3a77, 2 chunks 6.366 s (denoising 5.95 s, the denoiser kept), 4 chunks 6.565 s (6.16 s), 1 chunk 6.681 s
    (denoising 6.11 s, but the decode ran out of memory beside the bigger graph pool and ran again without it);
    H200, 7b1c684, 1 chunk 6.264 s (kept, 15.44 of 15.5 GiB reserved), 4 chunks 6.33-6.42 s. That t2i now gets
    2. An FP8 edit at 1024^2 under 15.5 GiB (arena 0.57 GiB with the shared prefix and one layer of query blocks,
    :mod:`bagel_rt.arena`; 1.14 GiB with blocks in every layer; 1.62 before the sharing; one forward 1.14 GiB at 2
    chunks, the decode 1.37 GiB, ~3.1 GiB of headroom) cannot keep its denoiser below 4 chunks: 2 chunks.
    Measured (H100, 1382226, one process, ``budget_memory.py --runs fp8@15.5:edit,fp8@15.5:edit+copied+chunks4,
    fp8@15.5:edit+chunks4``): **13.081 s**, peak 14.67 GiB, against 13.252 s, 14.92 GiB as before (prefix copied,
    4 chunks) and 13.123 s, 14.51 GiB (shared, 4 chunks)."""
    if not bagel.offload:
        return 1
    free = _headroom(bagel)
    if not free:
        return MIN_MLP_CHUNKS
    from .fast import weight_only
    from .memory_plan import denoise_activation_bytes

    model = bagel.model
    last = (bagel.fast_cache or {}).get("denoiser")
    if last is not None:
        free += last.arena_nbytes
    fallback = max(MIN_MLP_CHUNKS, math.ceil(rows * _mlp_row_bytes(bagel) / (MLP_SHARE * free)))
    if not decode_bytes:
        return fallback
    wo = weight_only(model.language_model.model.layers[0].mlp_moe_gen.gate_proj)
    counts = range(MIN_KEPT_CHUNKS, max(fallback, MAX_MLP_CHUNKS) + 1)
    need = {n: denoise_activation_bytes(model.params, rows, n, model.dtype.itemsize, wo) for n in counts}
    room = free - arena_bytes
    kept = next((n for n in counts if n < fallback and need[n] <= room - decode_bytes - VAE_SLACK), None)
    return kept or next((n for n in counts if need[n] <= room - DENOISE_SLACK), fallback)


#: bytes the budget must leave beyond the VAE decode's predicted need (allocator rounding, cuDNN workspaces) for
#: the denoiser to stay through it
VAE_SLACK = 512 * 2**20
#: bytes the budget must leave beyond the denoise phase's predicted need (arena and one forward,
#: :func:`bagel_rt.memory_plan.denoise_activation_bytes`) for a chunk count chosen without the decode beside it:
#: the measured phase peaks ran 0.13 GiB above the prediction (FP8 edit under 15.5 GiB, H200, 7b1c684: 14.89
#: against 14.76), and a capture that runs out falls back to eager forwards (``PackedDenoiser._refuse_graphs``)
DENOISE_SLACK = 512 * 2**20


def release_denoiser(bagel) -> None:
    """Under a budget, drop the denoiser kept from the last image (its arena, captured graphs and their pool) and
    return the cached memory, before a phase that needs the room: an input image's ViT and VAE encode, a text
    phase, a VAE decode that does not fit beside it (:func:`vae_fits`). A no-op without a budget."""
    if bagel.offload and bagel.fast_cache:
        bagel.fast_cache.clear()
        torch.cuda.empty_cache()


def vae_fits(bagel, height: int, width: int) -> bool:
    """Whether the VAE can decode a height x width image beside what is allocated now (the denoiser's arena and
    graph pool among it): always without a budget. Under one, a denoiser released before each VAE decode is
    built and captured again by the next request — one eager forward and one capture per branch set, every
    request. An FP8 t2i under 15.5 GiB leaves room for both (resident ~12.3 GiB, denoiser ~1 GiB, VAE decode
    ~1.4 GiB); an edit (arena of three branches, 0.57 GiB at 1024^2, and a larger forward) does not."""
    from .memory_plan import vae_decode_bytes

    free = _headroom(bagel)
    return free is None or free >= vae_decode_bytes(height, width) + VAE_SLACK


#: bytes left aside for what the allocator holds beyond the predicted tensors (CUDA-graph pools, rounding):
#: with 7 DF11 layers kept decoded under 24 GiB the request ran out of memory at 21.85 GiB allocated (H200,
#: ac07312)
ALLOCATOR_SLACK = 2 * 2**30


def keep_layers_decoded(bagel, budget_bytes: float) -> int:
    """DF11 resident under a budget: decode for good as many LLM layers as the headroom allows after the
    predicted transients of a 1024^2 edit (:func:`bagel_rt.memory_plan.request_transients`); returns how many.
    Layers decoded for good need no per-step decode (each costs ~0.28 GB more than compressed at full size)."""
    from .memory_plan import request_transients

    store = bagel.df11
    cost = store.layer_cost()
    free = _headroom(bagel, budget_bytes)
    if not cost or free is None:
        return 0
    spare = (free - request_transients(bagel.model.params, "edit", 1024, 1024, bagel.model.dtype.itemsize)["peak"]
             - ALLOCATOR_SLACK)
    n = 0
    for u in reversed(store.layer_units()):
        if u is None:
            continue
        if spare < cost:
            break
        store.keep_decoded(u.name)
        spare -= cost
        n += 1
    store.layout()
    return n


def out_of_memory_error(bagel, e: Exception) -> InputError:
    used = torch.cuda.memory_allocated(bagel.device) / GIB
    return InputError(f"the request does not fit in the GPU memory budget of {bagel.gpu_budget_gib:g} GiB "
                      f"({used:.2f} GiB allocated when it ran out); use a smaller image, nf4 weights, or a "
                      "larger --max-gpu-memory")
