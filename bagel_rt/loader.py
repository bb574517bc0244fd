"""``load(path)``: a checkpoint directory -> a ready :class:`bagel_rt.pipeline.Bagel`.

Reads ``llm_config.json`` and ``vit_config.json`` (with the reference's in-code overrides, see
:mod:`bagel_rt.config`), infers the VAE from ``ae.safetensors`` shapes, checks every key and shape of both
weight files strictly, then materialises the weights tensor by tensor on the target device and dtype.
Quantized (int8 / nf4) and DFloat11 checkpoints, and quantizing as it loads, go through
:func:`bagel_rt.quantized_load.load_weights`; the format comes from the checkpoint's own declaration.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import validate
from .checkpoint import check_keys, expected_shapes, load_into, read_header
from .config import BagelParams, llm_params_from_json, vit_params_from_json
from .df11_resident import FORMS as DF11_FORMS
from .errors import CheckpointError, InputError
from .model import BagelModel
from .tokenizer import TextTokenizer
from .vae import AutoEncoder, vae_params_from_shapes
from .validate import readable_dir

EMA_FILE, AE_FILE = "ema.safetensors", "ae.safetensors"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: directory not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory that holds {EMA_FILE}")
    readable_dir(path)


def read_params(path: Path, ae_file: str = AE_FILE) -> BagelParams:
    """Hyper-parameters of the checkpoint in ``path`` (configs + VAE shapes of ``ae_file``); reads no weights."""
    path = Path(path)
    _check_dir(path)
    llm = llm_params_from_json(path / "llm_config.json")
    vit = vit_params_from_json(path / "vit_config.json")
    vae = vae_params_from_shapes(read_header(path / ae_file).shapes(), str(path / ae_file))
    return BagelParams(llm=llm, vit=vit, vae=vae)


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
         progress: bool = False, backend: str = "auto", weights: str = "auto", df11_resident: bool = False,
         skip: Sequence[str] = (), compute: str = "auto", max_gpu_memory: float | None = None,
         attention: str = "auto", keep_bf16: bool = False, parallel: str | None = None,
         df11_form: str | None = None):
    """Load a BAGEL checkpoint directory.

    Args:
        path: directory in the official layout (``ema.safetensors``, ``ae.safetensors``, ``llm_config.json``,
            ``vit_config.json``, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``), its int8/nf4 variant
            (``ema.safetensors`` quantized, declared in its metadata) or the DFloat11 layout (``config.json`` with
            ``dfloat11_config``, top-level ``*.safetensors``, ``vae/ae.safetensors``); see
            :mod:`bagel_rt.quantized`. The format is read from the files, never from their names.
        device: where the model runs (default: CUDA if available, else CPU).
        dtype: dtype of the LLM/ViT weights and activations (default bf16, as the official app). The VAE
            stays fp32, as in the reference. Quantized weights keep their format.
        progress: show a progress bar over the bytes loaded.
        backend: "torch" (reference ops, any device), "triton" (batched CFG, fused kernels, CUDA graphs) or
            "auto" (triton on CUDA, torch elsewhere).
        weights: "auto" (what the checkpoint holds), "bf16", "int8", "nf4", "fp8", "fp8-gen-nf4-und" (the 12 GB
            recipe: generation expert FP8, understanding expert and lm_head NF4) or "df11". A bf16 (or df11)
            checkpoint is quantized to any of the others as it loads, Linear by Linear on ``device``; a df11
            checkpoint decodes to exact bf16; asking for what the checkpoint cannot give (bf16 from nf4) is an
            error.
        df11_resident: DF11 only: keep the weights compressed on the device and decode each unit (an LLM layer,
            a ViT layer, the embeddings, lm_head) just before it runs, into one of two shared buffers (bf16; the
            triton backend's denoiser decodes layer i+1 while layer i computes, inside its CUDA graph; text
            decoding runs on the torch path). Saves ~30 % of the weight memory at the cost of a decode per unit
            per forward; with ``max_gpu_memory`` as many LLM layers as the budget allows stay decoded.
        df11_form: with ``df11_resident``, the form the units are kept in (:data:`bagel_rt.df11_resident.FORMS`):
            "exp4" (the default: ~75 % of bf16, decoded at memory speed; a 1024² t2i under 24 GiB 1.08× bf16 on an
            H100) or "huffman" (DF11's own ~70 %, a serial decode: 1.75×) for budgets only it fits.
        skip: regular expressions of Linear weight names to keep bf16 when quantizing as it loads.
        compute: the generation expert's GEMM precision: "auto" (what the weights compute: FP8 weights in FP8
            on Ada/Hopper, everything else in bf16), "bf16", "fp8" (W8A8 on FP8 tensor cores, approximate; on
            bf16 weights their generation-expert Linears become FP8 and the bf16 copies are dropped) or "int8"
            (INT8 W8A8 on INT8 weights, approximate); see :mod:`bagel_rt.compute`.
        keep_bf16: with compute="fp8" on bf16 weights, keep the bf16 Linears too (6.5 GB at full size) so that
            ``pipe.compute = "bf16"`` can switch back (A/B work).
        attention: the triton backend's latent-query attention: "auto" (cuDNN on Hopper, else Triton),
            "triton" or "cudnn" (:func:`bagel_rt.fast.resolve_attention`).
        max_gpu_memory: GPU budget in GiB: the ViT, VAE and embeddings leave the GPU between their phases and
            the process is capped there; a request that cannot fit fails with a clear error
            (:mod:`bagel_rt.placement`).
        parallel: inside a multi-process run (``torchrun``, ``bagel-rt --gpus N``): "cfg" (CFG branches over the
            ranks), "tp" (tensor-parallel layers) or "layers" (consecutive layers per rank); each rank runs on
            ``cuda:LOCAL_RANK`` (or the CPU, with gloo). See :mod:`bagel_rt.parallel`.
    Returns:
        a :class:`bagel_rt.pipeline.Bagel` pipeline.
    """
    from .fast import resolve_attention
    from .pipeline import Bagel
    from .quantized import DF11_VAE, declares_df11, ema_format, resolve_weights
    from .quantized_load import load_weights, weight_files

    path = Path(path).expanduser()
    group = None
    if parallel is not None:
        from .parallel import init_group

        if max_gpu_memory is not None or df11_resident:
            raise InputError("parallel does not combine with max_gpu_memory or df11_resident yet")
        group = init_group(parallel, device)
        device = group.device
    device = validate.device(device) if device is not None else default_device()
    # where the weights are read: a split model is read on the CPU, and each rank moves only its part over
    load_device = group.load_device if group is not None else device
    resolve_attention(attention, device, dtype)  # an impossible choice fails before any weight is read
    if max_gpu_memory is not None and device.type == "cuda":
        from .placement import expandable_segments

        # the budget's allocator from the first allocation: weights staged and replaced while loading (DF11
        # units decoded for good, modules converted on the GPU) then leave no partly used fixed segments, which
        # the cap would count (see placement.STRANDED_BYTES)
        expandable_segments()
    t0 = time.perf_counter()
    if device.type == "cuda" and backend in ("triton", "auto"):
        from .kernels._device import warm_triton_cache_key

        warm_triton_cache_key()  # overlaps the weight streaming (0.36 s of a fresh process's first request)
    _check_dir(path)
    df11 = declares_df11(path)
    params = read_params(path, DF11_VAE if df11 else AE_FILE)
    if group is not None:
        from .parallel import check_fit

        check_fit(params, group)
    tokenizer = TextTokenizer.from_dir(path)
    if tokenizer.max_id >= params.llm.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has token id {tokenizer.max_id} but the model's embedding "
                              f"only {params.llm.vocab_size} rows (vocab_size of llm_config.json); tokenizer and "
                              "weights do not match")
    ema = None if df11 else read_header(path / EMA_FILE)
    stored = "df11" if df11 else ema_format(ema)
    fmt = resolve_weights(stored, weights, path)
    if df11_resident:
        if fmt != "df11":
            raise InputError(f"df11_resident needs DFloat11 weights; {path} holds {stored}, loaded as {fmt}")
        if dtype != torch.bfloat16:
            raise InputError(f"df11_resident decodes to bf16; got dtype {dtype}")
    if df11_form is not None and (not df11_resident or df11_form not in DF11_FORMS):
        raise InputError(f"df11_form must be one of {', '.join(DF11_FORMS)} and needs df11_resident=True; got "
                         f"{df11_form!r} with df11_resident={df11_resident}")
    ae = read_header(path / (DF11_VAE if df11 else AE_FILE))
    with torch.device("meta"):
        model = BagelModel(params, tokenizer.special)
        vae = AutoEncoder(params.vae)
    plain = stored == fmt == "bf16"
    if plain:
        check_keys(ema, expected_shapes(model), "a BAGEL model with the sizes of llm_config.json/vit_config.json")
    check_keys(ae, expected_shapes(vae), "a FLUX autoencoder")
    phases = {"read headers and configs": time.perf_counter() - t0}
    headers = [ema] if plain else [read_header(f) for f in weight_files(path, stored)]
    bar = _bytes_bar(sum(t.nbytes for h in (*headers, ae) for t in h.tensors.values()), progress)
    units = None  # the compressed DF11 units, with df11_resident
    if plain:
        load_into(model, ema, load_device, dtype, bar.update if bar else None)
    else:
        units = load_weights(model, path, stored, fmt, load_device, dtype, skip, bar.update if bar else None,
                             df11_resident, df11_form)
    phases["LLM + ViT weights"] = time.perf_counter() - t0 - sum(phases.values())
    load_into(vae, ae, load_device, torch.float32, bar.update if bar else None)
    if bar:
        bar.close()
    phases["VAE weights"] = time.perf_counter() - t0 - sum(phases.values())
    # inference only: no parameter ever needs a gradient (and autograd must never record a graph — an
    # edit's VAE encode at 1024^2 would keep ~17 GiB of activations alive)
    model.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    if group is not None:
        from .parallel import parallelize

        parallelize(model, vae, group)
        phases["split over ranks"] = time.perf_counter() - t0 - sum(phases.values())
    pipe = Bagel(model, vae, tokenizer, path=path, load_seconds=time.perf_counter() - t0, backend=backend,
                 weights=fmt)
    pipe.load_phases = {k: round(v, 3) for k, v in phases.items()}
    pipe.df11 = units
    pipe.keep_bf16 = keep_bf16
    if compute != "auto":
        pipe.compute = compute
    pipe.attention = attention
    if max_gpu_memory is not None:
        pipe.limit_gpu_memory(max_gpu_memory)
    return pipe


def _bytes_bar(total: int, enabled: bool, desc: str = "loading"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)
