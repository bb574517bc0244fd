"""``load(path)``: a checkpoint directory -> a ready :class:`bagel_rt.pipeline.Bagel`.

Reads ``llm_config.json`` and ``vit_config.json`` (with the reference's in-code overrides, see
:mod:`bagel_rt.config`), infers the VAE from ``ae.safetensors`` shapes, checks every key and shape of both
weight files strictly, then materialises the weights tensor by tensor on the target device and dtype.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import check_keys, expected_shapes, load_into, read_header
from .config import BagelParams, llm_params_from_json, vit_params_from_json
from .errors import CheckpointError
from .model import BagelModel
from .tokenizer import TextTokenizer
from .vae import AutoEncoder, vae_params_from_shapes

EMA_FILE, AE_FILE = "ema.safetensors", "ae.safetensors"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_params(path: Path) -> BagelParams:
    """Hyper-parameters of the checkpoint in ``path`` (configs + VAE shapes); reads no weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: directory not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory that holds {EMA_FILE}")
    llm = llm_params_from_json(path / "llm_config.json")
    vit = vit_params_from_json(path / "vit_config.json")
    vae = vae_params_from_shapes(read_header(path / AE_FILE).shapes(), str(path / AE_FILE))
    return BagelParams(llm=llm, vit=vit, vae=vae)


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
         progress: bool = False, backend: str = "auto"):
    """Load a BAGEL checkpoint directory.

    Args:
        path: directory in the official layout (``ema.safetensors``, ``ae.safetensors``, ``llm_config.json``,
            ``vit_config.json``, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``).
        device: where the model runs (default: CUDA if available, else CPU).
        dtype: dtype of the LLM/ViT weights and activations (default bf16, as the official app). The VAE
            stays fp32, as in the reference.
        progress: show a progress bar over the bytes loaded.
        backend: "torch" (reference ops, any device), "triton" (batched CFG, fused kernels, CUDA graphs) or
            "auto" (triton on CUDA, torch elsewhere).
    Returns:
        a :class:`bagel_rt.pipeline.Bagel` pipeline.
    """
    from .pipeline import Bagel

    path = Path(path).expanduser()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device} requested but CUDA is not available on this machine")
    t0 = time.perf_counter()
    params = read_params(path)
    tokenizer = TextTokenizer.from_dir(path)
    if tokenizer.vocab_size > params.llm.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"embedding only {params.llm.vocab_size} rows; tokenizer and weights do not match")
    ema = read_header(path / EMA_FILE)
    ae = read_header(path / AE_FILE)
    with torch.device("meta"):
        model = BagelModel(params, tokenizer.special)
        vae = AutoEncoder(params.vae)
    check_keys(ema, expected_shapes(model), "a BAGEL model with the sizes of llm_config.json/vit_config.json")
    check_keys(ae, expected_shapes(vae), "a FLUX autoencoder")
    bar = _bytes_bar(sum(t.nbytes for t in ema.tensors.values()) + sum(t.nbytes for t in ae.tensors.values()),
                     progress)
    load_into(model, ema, device, dtype, bar.update if bar else None)
    load_into(vae, ae, device, torch.float32, bar.update if bar else None)
    if bar:
        bar.close()
    # inference only: no parameter ever needs a gradient (and autograd must never record a graph — an
    # edit's VAE encode at 1024^2 would keep ~17 GiB of activations alive)
    model.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return Bagel(model, vae, tokenizer, path=path, load_seconds=time.perf_counter() - t0, backend=backend)


def _bytes_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="loading", leave=False)
