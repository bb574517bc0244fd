"""Model hyper-parameters as frozen dataclasses, read from the official JSON files.

The official loader overrides three LLM fields in code (``qk_norm=True``, ``tie_word_embeddings=False``,
the MoT layer type) and builds one ViT layer fewer than ``vit_config.json`` says (the last layer is
dropped, ``post_layernorm`` still applied). Those overrides live here, in :func:`load_params`, so every
checkpoint is read the same way. VAE hyper-parameters are not in any JSON file; they are inferred from the
shapes in ``ae.safetensors`` (:func:`bagel_rt.vae.vae_params_from_shapes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError


@dataclass(frozen=True)
class LLMParams:
    """Qwen2-style MoT language model. Both experts share these sizes."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ViTParams:
    """SigLIP NaViT encoder. ``num_layers`` is the number of layers actually built (file value - 1)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    layer_norm_eps: float = 1e-6

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class VAEParams:
    """FLUX autoencoder. ``ch_mult`` gives the channel multiplier per resolution level."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class BagelParams:
    """The whole model: LLM, ViT, VAE and the glue sizes of ``BagelConfig``."""

    llm: LLMParams = field(default_factory=LLMParams)
    vit: ViTParams = field(default_factory=ViTParams)
    vae: VAEParams = field(default_factory=VAEParams)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    timestep_freq_dim: int = 256

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token along one side (16 for BAGEL)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample


#: Named configurations. "bagel-7b-mot" is the released checkpoint (reference doc section 1).
CONFIGS: dict[str, BagelParams] = {"bagel-7b-mot": BagelParams()}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (every BAGEL checkpoint has it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _field(path: Path, data: dict, key: str, kind: type, default=None):
    if key not in data:
        if default is not None:
            return default
        raise CheckpointError(f"{path}: missing key {key!r}")
    value = data[key]
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{path}: key {key!r} is {value!r}, expected {kind.__name__}")
    return value


def llm_params_from_json(path: Path) -> LLMParams:
    """Read ``llm_config.json`` (a stock Qwen2 config). qk-norm and untied embeddings are implied."""
    d = _read_json(path)
    mt = d.get("model_type", "qwen2")
    if mt != "qwen2":
        raise CheckpointError(f"{path}: model_type is {mt!r}, expected 'qwen2' (is this a BAGEL checkpoint?)")
    try:
        return LLMParams(
            hidden_size=_field(path, d, "hidden_size", int),
            intermediate_size=_field(path, d, "intermediate_size", int),
            num_layers=_field(path, d, "num_hidden_layers", int),
            num_heads=_field(path, d, "num_attention_heads", int),
            num_kv_heads=_field(path, d, "num_key_value_heads", int),
            vocab_size=_field(path, d, "vocab_size", int),
            rope_theta=_field(path, d, "rope_theta", float, 10000.0),
            rms_norm_eps=_field(path, d, "rms_norm_eps", float, 1e-6),
        )
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}") from None


def vit_params_from_json(path: Path) -> ViTParams:
    """Read ``vit_config.json``; the model uses one layer fewer than the file declares."""
    d = _read_json(path)
    n = _field(path, d, "num_hidden_layers", int)
    if n < 2:
        raise CheckpointError(f"{path}: num_hidden_layers is {n}, expected at least 2 (one is dropped)")
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise CheckpointError(f"{path}: hidden_act is {act!r}, expected 'gelu_pytorch_tanh'")
    return ViTParams(
        hidden_size=_field(path, d, "hidden_size", int),
        intermediate_size=_field(path, d, "intermediate_size", int),
        num_layers=n - 1,
        num_heads=_field(path, d, "num_attention_heads", int),
        patch_size=_field(path, d, "patch_size", int),
        image_size=_field(path, d, "image_size", int),
        layer_norm_eps=_field(path, d, "layer_norm_eps", float, 1e-6),
    )
