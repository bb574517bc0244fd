"""Model hyper-parameters as frozen dataclasses, read from the official JSON files.

The official loader overrides three LLM fields in code (``qk_norm=True``, ``tie_word_embeddings=False``,
the MoT layer type) and builds one ViT layer fewer than ``vit_config.json`` says (the last layer is
dropped, ``post_layernorm`` still applied). Those overrides live here, in :func:`load_params`, so every
checkpoint is read the same way. VAE hyper-parameters are not in any JSON file; they are inferred from the
shapes in ``ae.safetensors`` (:func:`bagel_rt.vae.vae_params_from_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError
from .transforms import VIT_RESIZE
from .validate import config_float, config_int, read_json_object


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
    #: the longest context (prompt + decoded tokens) the model was trained for (``max_position_embeddings``)
    max_positions: int = 32768

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


#: Bounds of the config values: generous (BAGEL-7B-MoT is far inside them), but every size is finite and small
#: enough that building the model on the meta device takes moments, and every divisor is positive.
MAX_WIDTH, MAX_LAYERS, MAX_HEADS, MAX_VOCAB, MAX_POSITIONS = 1 << 16, 256, 1024, 1 << 22, 1 << 20


def llm_params_from_json(path: Path) -> LLMParams:
    """Read ``llm_config.json`` (a stock Qwen2 config). qk-norm and untied embeddings are implied.

    Every value is range-checked (:class:`CheckpointError` naming the key, its value and the range)."""
    d = read_json_object(path, "LLM config (llm_config.json)")
    mt = d.get("model_type", "qwen2")
    if mt != "qwen2":
        raise CheckpointError(f"{path}: model_type is {mt!r}, expected 'qwen2' (is this a BAGEL checkpoint?)")
    heads = config_int(path, d, "num_attention_heads", 1, MAX_HEADS)
    kv_heads = config_int(path, d, "num_key_value_heads", 1, heads)
    hidden = config_int(path, d, "hidden_size", 2 * heads, MAX_WIDTH)
    if hidden % (2 * heads) or heads % kv_heads:
        raise CheckpointError(f"{path}: hidden_size {hidden}, num_attention_heads {heads}, num_key_value_heads "
                              f"{kv_heads}: expected an even head size (hidden_size / heads) and heads divisible "
                              "by key-value heads")
    return LLMParams(
        hidden_size=hidden,
        intermediate_size=config_int(path, d, "intermediate_size", 1, 8 * MAX_WIDTH),
        num_layers=config_int(path, d, "num_hidden_layers", 1, MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads,
        vocab_size=config_int(path, d, "vocab_size", 1, MAX_VOCAB),
        rope_theta=config_float(path, d, "rope_theta", 0.0, 1e12, 10000.0),
        rms_norm_eps=config_float(path, d, "rms_norm_eps", 0.0, 0.1, 1e-6),
        max_positions=config_int(path, d, "max_position_embeddings", 64, MAX_POSITIONS, 32768),
    )


def vit_params_from_json(path: Path) -> ViTParams:
    """Read ``vit_config.json``; the model uses one layer fewer than the file declares.

    The images the ViT sees are resized to multiples of 14 up to 980 pixels a side (``VIT_RESIZE``) and index a
    position grid of ``vit_max_num_patch_per_side`` = 70, so the patch size must be 14 and the ViT's own table
    must cover 980 pixels; other values are rejected here rather than failing inside a request."""
    longest, _, stride = VIT_RESIZE
    d = read_json_object(path, "ViT config (vit_config.json)")
    n = config_int(path, d, "num_hidden_layers", 2, MAX_LAYERS + 1)
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise CheckpointError(f"{path}: hidden_act is {act!r}, expected 'gelu_pytorch_tanh'")
    heads = config_int(path, d, "num_attention_heads", 1, MAX_HEADS)
    hidden = config_int(path, d, "hidden_size", heads, MAX_WIDTH)
    if hidden % heads:
        raise CheckpointError(f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    patch = config_int(path, d, "patch_size", stride, stride)
    return ViTParams(
        hidden_size=hidden,
        intermediate_size=config_int(path, d, "intermediate_size", 1, 8 * MAX_WIDTH),
        num_layers=n - 1,
        num_heads=heads,
        patch_size=patch,
        image_size=config_int(path, d, "image_size", longest, 4 * longest),
        layer_norm_eps=config_float(path, d, "layer_norm_eps", 0.0, 0.1, 1e-6),
    )
