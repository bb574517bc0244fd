"""A deterministic tiny BAGEL in the official layout — the CLI's embedded default and the tests' model.

:func:`write_tiny_checkpoint` writes ``ema.safetensors`` (bf16, the official key names), ``ae.safetensors``
(fp32), ``llm_config.json``, ``vit_config.json`` (declaring one layer more than is used, like the official
file) and a small byte-level BPE ``tokenizer.json`` carrying BAGEL's special tokens. The weights are
random (seeded), so outputs are noise: the point is to exercise every code path in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import writing_directory
from .config import BagelParams, LLMParams, VAEParams, ViTParams
from .embeddings import sincos_2d_table
from .model import BagelModel, SpecialTokens
from .vae import AutoEncoder

TINY_VERSION = "tiny-v1"
TINY_PARAMS = BagelParams(
    llm=LLMParams(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                  vocab_size=512, rope_theta=1_000_000.0),
    vit=ViTParams(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=14, image_size=980),
    vae=VAEParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2),
)

#: the tiny model with 8 query and 4 key/value heads (head size 16, the smallest the Triton kernels take) and 4
#: layers: tensor parallelism and a layer split over 4 processes split it
TINY_TP4_PARAMS = BagelParams(
    llm=LLMParams(hidden_size=128, intermediate_size=160, num_layers=4, num_heads=8, num_kv_heads=4,
                  vocab_size=512, rope_theta=1_000_000.0),
    vit=TINY_PARAMS.vit, vae=TINY_PARAMS.vae,
)


def default_tiny_dir() -> Path:
    """Where the CLI keeps the embedded tiny model: ``$BAGEL_RT_CACHE`` or ``$XDG_CACHE_HOME/bagel-rt``."""
    root = os.environ.get("BAGEL_RT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bagel-rt")
    return Path(root) / TINY_VERSION


def _init_tensor(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """Random but non-degenerate values: norms ~ 1 +- 0.1, biases small, weights ~ 1/sqrt(fan_in)."""
    if name.endswith("pos_embed"):
        side = int(round(shape[0] ** 0.5))
        return sincos_2d_table(shape[1], side)
    base = name.rsplit(".", 1)[-1]
    is_norm = any(s in name for s in ("norm", "layer_norm", "post_layernorm"))
    if base == "weight" and is_norm and len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if base == "bias":
        return 0.02 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return torch.randn(shape, generator=g)
    fan_in = int(torch.tensor(shape[1:]).prod())
    if "embed_tokens" in name or "position_embedding" in name:
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / fan_in**0.5


def _random_state(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    return {k: _init_tensor(k, shapes[k], g).to(dtype).contiguous() for k in sorted(shapes)}


def _llm_config(p: LLMParams) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": p.hidden_size, "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers, "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads, "vocab_size": p.vocab_size, "rope_theta": p.rope_theta,
        "rms_norm_eps": p.rms_norm_eps, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _vit_config(p: ViTParams) -> dict:
    return {
        "model_type": "siglip_vision_model", "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size, "num_hidden_layers": p.num_layers + 1,
        "num_attention_heads": p.num_heads, "num_channels": 3, "patch_size": p.patch_size,
        "image_size": p.image_size, "layer_norm_eps": p.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
    }


def write_tiny_checkpoint(path: str | Path, seed: int = 0, overwrite: bool = False,
                          params: BagelParams = TINY_PARAMS) -> Path:
    """Write the tiny checkpoint to ``path`` atomically (a temporary sibling renamed into place).

    The same ``seed`` gives byte-identical files. Refuses to replace an existing directory unless
    ``overwrite``. ``params``: another tiny configuration (e.g. :data:`TINY_TP4_PARAMS`).
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace a file")
    with writing_directory(path) as tmp:
        p = params
        special = SpecialTokens(476, 477, 478, 479)
        with torch.device("meta"):
            model, vae = BagelModel(p, special), AutoEncoder(p.vae)
        meta = {"bagel_rt.format": "bf16"}  # one key: safetensors does not keep metadata order stable
        save_file(_random_state(model, seed, torch.bfloat16), str(tmp / "ema.safetensors"), metadata=meta)
        save_file(_random_state(vae, seed + 1, torch.float32), str(tmp / "ae.safetensors"))
        write_configs_and_tokenizer(tmp, p)
    return path


def write_configs_and_tokenizer(directory: Path, p: BagelParams) -> None:
    """The official layout's ``llm_config.json`` and ``vit_config.json`` for ``p``, and the embedded tiny
    tokenizer as ``tokenizer.json`` (its ids are valid rows of any BAGEL embedding)."""
    (directory / "llm_config.json").write_text(json.dumps(_llm_config(p.llm), indent=2))
    (directory / "vit_config.json").write_text(json.dumps(_vit_config(p.vit), indent=2))
    tok = resources.files("bagel_rt").joinpath("data/tiny_tokenizer.json").read_text(encoding="utf-8")
    (directory / "tokenizer.json").write_text(tok, encoding="utf-8")


def ensure_tiny_checkpoint(path: Path | None = None) -> tuple[Path, bool]:
    """The embedded tiny model's directory, written on first use. Returns (path, created_now)."""
    path = path or default_tiny_dir()
    if (path / "ema.safetensors").is_file():
        return path, False
    return write_tiny_checkpoint(path, overwrite=True), True
