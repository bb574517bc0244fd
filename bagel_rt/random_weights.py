"""Full-size models with random weights, built directly on the GPU, for benchmarks and memory checks.

The model is built on the meta device, every tensor of the expected key set is drawn on the target device
(norms ~1, linear weights ~N(0, 0.02), the stored sin-cos tables computed exactly), and the result goes
through the same strict ``load_state_dict(assign=True)`` step as a checkpoint file. Nothing passes through
host memory, so 14.6B parameters cost nothing but GPU memory and a second of time.
"""

from __future__ import annotations

import torch

from .config import CONFIGS, BagelParams
from .embeddings import sincos_2d_table
from .model import BagelModel
from .tokenizer import TextTokenizer
from .vae import AutoEncoder


def _random_tensor(name: str, shape: torch.Size, device, dtype, g: torch.Generator) -> torch.Tensor:
    if name.endswith("pos_embed"):
        return sincos_2d_table(shape[1], int(round(shape[0] ** 0.5))).to(device, dtype)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and leaf == "weight":  # norm weights
        return (1.0 + 0.05 * torch.randn(shape, generator=g, device=device)).to(dtype)
    if leaf == "bias":
        return (0.01 * torch.randn(shape, generator=g, device=device)).to(dtype)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    std = 0.02 if len(shape) == 2 else (1.0 / fan_in) ** 0.5
    return (std * torch.randn(shape, generator=g, device=device, dtype=torch.float32)).to(dtype)


def random_module(module_fn, device, dtype: torch.dtype, seed: int):
    """Build ``module_fn()`` on meta and fill every state-dict entry with seeded random values on ``device``."""
    with torch.device("meta"):
        module = module_fn()
    g = torch.Generator(device=device).manual_seed(seed)
    state = {k: _random_tensor(k, v.shape, device, dtype, g) for k, v in module.state_dict().items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def random_bagel(name_or_params: str | BagelParams = "bagel-7b-mot", device="cuda", dtype=torch.bfloat16,
                 seed: int = 0, backend: str = "auto"):
    """A :class:`bagel_rt.pipeline.Bagel` of the given configuration with random weights.

    Uses the embedded tiny tokenizer (its ids are valid rows of any BAGEL embedding); the VAE is fp32.
    """
    from importlib import resources
    from pathlib import Path

    from .pipeline import Bagel

    params = CONFIGS[name_or_params] if isinstance(name_or_params, str) else name_or_params
    tok_dir = Path(str(resources.files("bagel_rt").joinpath("data")))
    tokenizer = TextTokenizer.from_file(tok_dir / "tiny_tokenizer.json")
    device = torch.device(device)
    model = random_module(lambda: BagelModel(params, tokenizer.special), device, dtype, seed)
    vae = random_module(lambda: AutoEncoder(params.vae), device, torch.float32, seed + 1)
    return Bagel(model, vae, tokenizer, path=None, backend=backend)
