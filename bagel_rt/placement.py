"""Memory placement: keep on the GPU only what the current phase needs (``max_gpu_memory``).

BAGEL's parts are used in distinct phases: the ViT (+ connector and its position table) only while an input
image is prefilled, the VAE only to encode input images and decode the result, the token embedding only
for a handful of lookups per forward. Under a memory budget these live in CPU memory and visit the GPU only
for their phase (the embedding never does: its few rows are looked up on the CPU). Both LLM experts stay
resident: every denoising forward needs the generation expert for the latents *and* the understanding
expert for the two image-marker tokens, and streaming 6.5B parameters per step over PCIe would cost more
than the step.

The budget itself is enforced with ``torch.cuda.set_per_process_memory_fraction``; a request that does not
fit raises :class:`bagel_rt.errors.InputError` saying what was resident and what was asked.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import InputError

GIB = 2**30


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextmanager
def visiting(module: nn.Module, device: torch.device, enabled: bool):
    """Move ``module`` to ``device`` for the ``with`` block and back to the CPU afterwards (if enabled)."""
    if not enabled:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def phase_modules(model) -> list[nn.Module]:
    """The model parts that are only needed while an input image is prefilled (ViT path)."""
    return [model.vit_model, model.connector, model.vit_pos_embed]


def limit_gpu_memory(bagel, gib: float) -> dict:
    """Place ``bagel`` for a GPU budget of ``gib`` GiB and cap the process at it.

    Returns what is resident. Raises :class:`InputError` when the resident weights alone exceed the budget.
    """
    device = bagel.device
    if device.type != "cuda":
        raise InputError("max_gpu_memory applies to CUDA devices only")
    if bagel.df11_resident:
        raise InputError("max_gpu_memory does not combine with df11_resident yet")
    model = bagel.model
    emb = model.language_model.model.embed_tokens
    emb.to("cpu")
    for m in phase_modules(model):
        m.to("cpu")
    bagel.vae.to("cpu")
    bagel.offload = True
    bagel.fast_cache.clear()
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated(device) / GIB
    if resident > gib:
        raise InputError(f"the resident weights need {resident:.2f} GiB of GPU memory, more than the "
                         f"max_gpu_memory budget of {gib:g} GiB (try nf4 weights)")
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total), device)
    bagel.gpu_budget_gib = gib
    return {"resident_gib": round(resident, 2), "budget_gib": gib,
            "offloaded": ["embed_tokens", "vit_model", "connector", "vit_pos_embed", "vae"]}


def out_of_memory_error(bagel, e: Exception) -> InputError:
    used = torch.cuda.memory_allocated(bagel.device) / GIB
    return InputError(f"the request does not fit in the GPU memory budget of {bagel.gpu_budget_gib:g} GiB "
                      f"({used:.2f} GiB allocated when it ran out); use a smaller image, nf4 weights, or a "
                      "larger --max-gpu-memory")
