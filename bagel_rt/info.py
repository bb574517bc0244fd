"""What a checkpoint directory holds, read from file headers only (no weights are loaded): ``bagel-rt info``.

:func:`checkpoint_info` returns a JSON-ready dict: the weight format, every file with its size (and, for
safetensors files, tensor counts and dtypes), the parameter count of each component, the hyper-parameters and
an *estimate* of the GPU memory that bf16 inference at 1024x1024 needs. :func:`format_info` renders that dict
as text.

Components are told apart by key name (reference doc 2.2): ``language_model.*`` splits into the understanding
expert, the generation expert (``*_moe_gen``) and the token embeddings + ``lm_head``; ``vit_model.*`` is the
ViT; ``connector``, ``vit_pos_embed``, ``latent_pos_embed``, ``time_embedder``, ``vae2llm`` and ``llm2vae`` are
the glue; ``ae.safetensors`` is the VAE. Quantized files count the logical weights (an NF4 weight packs two
values per byte; its shape is read from the small bitsandbytes quant-state tensor), not scales or code books.

``part_formats`` says which format each part (:data:`PARTS`: ViT, connector + glue, the two experts, the token
embeddings, ``lm_head``, VAE) is stored in, from its weight matrices (tensors of two or more dimensions; norms and
biases are left out): a Linear is int8 when it has bitsandbytes' ``SCB``, nf4 with its NF4 quant state, fp8 with
an e4m3 weight and ``weight_scale``, df11 inside a DFloat11 unit, else the dtype of its tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from .checkpoint import SafetensorsHeader, read_header
from .config import BagelParams, llm_params_from_json, vit_params_from_json
from .errors import CheckpointError
from .loader import AE_FILE, EMA_FILE, read_params
from .transforms import VAE_RESIZE, VIT_RESIZE, resize_dims
from .vae import vae_params_from_shapes
from .validate import df11_declared

__all__ = ["checkpoint_info", "format_info", "memory_estimate", "component_of", "part_of", "COMPONENTS", "PARTS"]

#: Component keys of ``info["parameters"]`` and how they are printed, in order.
COMPONENTS: dict[str, str] = {
    "llm_und": "LLM understanding expert",
    "llm_gen": "LLM generation expert",
    "embeddings": "embeddings + lm_head",
    "vit": "ViT (SigLIP)",
    "glue": "connector + glue",
    "vae": "VAE (FLUX autoencoder)",
    "other": "other",
}
#: Parts of ``info["part_formats"]`` and how they are printed, in order.
PARTS: dict[str, str] = {
    "vit": "ViT",
    "connector": "connector + glue",
    "llm_und": "und expert",
    "llm_gen": "gen expert",
    "embed_tokens": "token embeddings",
    "lm_head": "lm_head",
    "vae": "VAE",
    "other": "other",
}
_GLUE = {"connector", "vit_pos_embed", "latent_pos_embed", "time_embedder", "vae2llm", "llm2vae"}
# Quantization side tensors: bytes on disk and on the GPU, but not parameters of the model.
_QUANT_AUX = (".SCB", ".weight_format", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
              ".weight.nested_quant_map", ".weight.quant_state.bitsandbytes__nf4",
              ".weight.quant_state.bitsandbytes__fp4")
_NF4_STATE = ".quant_state.bitsandbytes__nf4"
# DFloat11 unit buffers (quant.df11_decode.BUFFER_NAMES, named here to keep Triton out of `info`)
_DF11_BUFFERS = (".luts", ".encoded_exponent", ".sign_mantissa", ".output_positions", ".gaps", ".split_positions")
_FLOAT_FORMATS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_LAYER_UNIT = re.compile(r"language_model\.model\.layers\.\d+")  # a DF11 unit holding both experts' Linears
_ESTIMATE_SIZE = (1024, 1024)
_TEXT_TOKENS = 128  # assumed prompt length (with framing) for the memory estimate


def component_of(key: str) -> str:
    """The component (a key of :data:`COMPONENTS`, never ``"vae"``) an ``ema.safetensors`` key belongs to."""
    if key.startswith("language_model."):
        if ".embed_tokens." in key or key.startswith("language_model.lm_head."):
            return "embeddings"
        return "llm_gen" if "_moe_gen" in key else "llm_und"
    if key.startswith("vit_model."):
        return "vit"
    if key.split(".", 1)[0] in _GLUE:
        return "glue"
    return "other"


def part_of(key: str) -> str:
    """The part (a key of :data:`PARTS`, never ``"vae"``) an ``ema.safetensors`` key belongs to."""
    if key.startswith("language_model.lm_head."):
        return "lm_head"
    if ".embed_tokens." in key:
        return "embed_tokens"
    comp = component_of(key)
    return "connector" if comp == "glue" else comp


def _tensor_format(key: str, h: SafetensorsHeader) -> str | None:
    """The format of a weight matrix of ``h`` (None for side tensors, norms and biases)."""
    t = h.tensors[key]
    if key.endswith(_QUANT_AUX) or key.endswith(".weight_scale"):
        return None
    base = key.removesuffix(".weight")
    if key.endswith(".weight") and f"{base}.SCB" in h.tensors:
        return "int8"
    if key + _NF4_STATE in h.tensors:
        return "nf4"
    if t.dtype == "F8_E4M3" and f"{base}.weight_scale" in h.tensors:
        return "fp8"
    if len(t.shape) < 2:
        return None
    return _FLOAT_FORMATS.get(t.dtype, t.dtype.lower())


def _part_formats(ema: SafetensorsHeader, logical: dict[str, int], ae: SafetensorsHeader) -> dict:
    """part -> {format: parameters} of its weight matrices (the VAE: its float dtypes)."""
    out: dict[str, dict[str, int]] = {}
    for key in ema.tensors:
        fmt = _tensor_format(key, ema)
        if fmt is not None:
            part = out.setdefault(part_of(key), {})
            part[fmt] = part.get(fmt, 0) + logical.get(key, 0)
    for t in ae.tensors.values():
        if len(t.shape) >= 2:
            fmt = _FLOAT_FORMATS.get(t.dtype, t.dtype.lower())
            out.setdefault("vae", {})[fmt] = out.get("vae", {}).get(fmt, 0) + math.prod(t.shape)
    return {p: dict(sorted(out[p].items(), key=lambda kv: -kv[1])) for p in PARTS if p in out}


def checkpoint_info(path: str | Path) -> dict:
    """Describe the checkpoint directory ``path`` from its headers and configs (no weights are read).

    Returns a dict (JSON-serialisable) with:
        path, format (``bf16`` / ``fp16`` / ``fp32`` / ``int8`` / ``nf4`` / ``df11`` / what the metadata says),
        format_source (where the format was read from), files (name, bytes, and for safetensors: tensors,
        dtypes, metadata), total_bytes, parameters and component_bytes (per component of :data:`COMPONENTS`
        plus ``total``; None for DF11, whose weights are compressed), hyper_parameters (the
        :class:`bagel_rt.config.BagelParams` fields plus derived sizes), memory_estimate (see
        :func:`memory_estimate`).
    Raises:
        CheckpointError: the directory or a file the layout needs is missing, truncated or corrupt.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: directory not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory that holds {EMA_FILE}")
    if _is_df11(path):
        return _df11_info(path)
    ema, ae = read_header(path / EMA_FILE), read_header(path / AE_FILE)
    params = read_params(path)
    fmt, source = _format_of(ema)
    counts = {c: 0 for c in COMPONENTS}
    nbytes = {c: 0 for c in COMPONENTS}
    logical = _logical_numels(ema)
    parts = _part_formats(ema, logical, ae)
    for key, t in ema.tensors.items():
        comp = component_of(key)
        counts[comp] += logical.get(key, 0)
        nbytes[comp] += t.nbytes
    for t in ae.tensors.values():
        counts["vae"] += math.prod(t.shape)
        nbytes["vae"] += t.nbytes
    if not counts["other"] and not nbytes["other"]:
        del counts["other"], nbytes["other"]
    counts["total"], nbytes["total"] = sum(counts.values()), sum(nbytes.values())
    model_params = counts["total"] - counts["vae"]
    # bf16 inference: float weights become 2 bytes each, quantized ones stay as stored; the VAE runs in fp32.
    weights = (model_params * 2 if fmt in _FLOAT_FORMATS.values() else sum(t.nbytes for t in ema.tensors.values()))
    weights += counts["vae"] * 4
    files = _files(path)
    return {
        "path": str(path),
        "format": fmt,
        "format_source": source,
        "part_formats": parts,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "parameters": counts,
        "component_bytes": nbytes,
        "hyper_parameters": _hyper(params),
        "memory_estimate": memory_estimate(params, weights),
    }


def memory_estimate(params: BagelParams, weights_bytes: int, height: int = _ESTIMATE_SIZE[0],
                    width: int = _ESTIMATE_SIZE[1], text_tokens: int = _TEXT_TOKENS) -> dict:
    """Estimate the peak GPU memory of bf16 inference at ``height`` x ``width`` (not a measurement).

    peak = weights + KV caches + max(LLM activations of one denoising layer, VAE activations at full size).

    * KV cache per token = 2 (K, V) x layers x kv_heads x head_dim x 2 bytes (56 KiB for BAGEL-7B-MoT).
      Tokens: the three CFG contexts (cond, text-uncond, image-uncond) plus, in each context that is run,
      the latent query block (h*w + 2 tokens) reserved during denoising. Text-to-image contexts hold the
      prompt only and run 2 branches (the image-unconditional one equals the conditional one); an edit of a
      ``height`` x ``width`` image adds its VAE and ViT blocks to cond and text-uncond and runs 3 branches.
    * LLM activations: all branches batched, (3 x intermediate + 6 x hidden) bf16 values per query row.
    * VAE: three fp32 feature maps of the full-resolution level (ch x ch_mult[0] channels) at height x width.
    The CUDA context (~0.5 GiB) and allocator fragmentation are not included.
    """
    llm, ds = params.llm, params.latent_downsample
    kv_per_token = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * 2
    n_latent = (height // ds) * (width // ds) + 2
    vw, vh = resize_dims(*resize_dims(width, height, *VAE_RESIZE), *VIT_RESIZE)
    n_vit = (vw // params.vit.patch_size) * (vh // params.vit.patch_size) + 2
    llm_row = (3 * llm.intermediate_size + 6 * llm.hidden_size) * 2
    vae_act = 3 * params.vae.ch * params.vae.ch_mult[0] * height * width * 4
    cases = {
        # (tokens in cond, text-uncond, image-uncond contexts), branches run per step
        "text_to_image": ((text_tokens, 0, text_tokens), 2),
        "edit": ((n_latent + n_vit + text_tokens, n_latent + n_vit, text_tokens), 3),
    }
    out = {
        "label": f"estimate for bf16 inference at {height}x{width} (not a measurement)",
        "height": height, "width": width, "assumed_text_tokens": text_tokens,
        "weights_bytes": int(weights_bytes), "kv_bytes_per_token": kv_per_token,
    }
    for name, (ctx_tokens, branches) in cases.items():
        kv_tokens = sum(ctx_tokens) + branches * n_latent
        llm_act = branches * n_latent * llm_row
        act = max(llm_act, vae_act)
        out[name] = {
            "context_tokens": list(ctx_tokens), "branches": branches, "kv_tokens": kv_tokens,
            "kv_bytes": kv_tokens * kv_per_token, "llm_activation_bytes": llm_act, "vae_activation_bytes": vae_act,
            "total_bytes": int(weights_bytes) + kv_tokens * kv_per_token + act,
        }
    return out


def format_info(d: dict) -> str:
    """Render a :func:`checkpoint_info` dict as aligned text."""
    lines = [f"checkpoint   {d['path']}", f"format       {d['format']} ({d['format_source']})"]
    if d.get("part_formats"):
        lines.append("part formats (weight matrices)")
        for part, fmts in d["part_formats"].items():
            counted = None not in fmts.values() and len(fmts) > 1 and sum(fmts.values()) > 0
            shares = [f"{f} {n / sum(fmts.values()):.1%}" if counted else f for f, n in fmts.items()]
            lines.append(f"  {PARTS[part]:<18} {', '.join(shares)}")
    lines.append("files")
    width = max(len(f["name"]) for f in d["files"]) if d["files"] else 0
    for f in d["files"]:
        extra = ""
        if "tensors" in f:
            dtypes = ", ".join(f"{k} {v}" for k, v in f["dtypes"].items())
            extra = f"  {f['tensors']:>5} tensors ({dtypes})"
        lines.append(f"  {f['name']:<{width}}  {_human(f['bytes']):>10}{extra}")
    lines.append(f"  {'total':<{width}}  {_human(d['total_bytes']):>10}")
    if d["parameters"] is not None:
        lines.append("parameters")
        for comp, n in d["parameters"].items():
            name = "total" if comp == "total" else COMPONENTS[comp]
            lines.append(f"  {name:<26} {n:>15,}  {_human(d['component_bytes'][comp]):>10} stored")
    hp = d["hyper_parameters"]
    if hp is not None:
        llm, vit, vae = hp["llm"], hp["vit"], hp["vae"]
        lines += [
            "hyper-parameters",
            f"  LLM  hidden {llm['hidden_size']}, intermediate {llm['intermediate_size']}, {llm['num_layers']} "
            f"layers, {llm['num_heads']} heads ({llm['num_kv_heads']} KV) of {llm['head_dim']}, "
            f"vocab {llm['vocab_size']}, rope_theta {llm['rope_theta']:g}",
            f"  ViT  hidden {vit['hidden_size']}, intermediate {vit['intermediate_size']}, "
            f"{vit['num_layers']} layers used (+1 dropped), {vit['num_heads']} heads, patch {vit['patch_size']}, "
            f"image {vit['image_size']}",
            f"  VAE  ch {vae['ch']}, ch_mult {tuple(vae['ch_mult'])}, z {vae['z_channels']}; "
            f"{hp['latent_downsample']} px per latent token, max image side {hp['max_image_side']}",
        ]
    m = d["memory_estimate"]
    if m is not None:
        lines += [f"GPU memory: {m['label']}",
                  f"  weights {_human(m['weights_bytes'])}; KV cache {_human(m['kv_bytes_per_token'])} per token"]
        for name in ("text_to_image", "edit"):
            c = m[name]
            act = max(c["llm_activation_bytes"], c["vae_activation_bytes"])
            lines.append(f"  {name.replace('_', '-'):<14} ~{_human(c['total_bytes'])}  "
                         f"(KV {c['kv_tokens']:,} tokens = {_human(c['kv_bytes'])}, activations {_human(act)}, "
                         f"{c['branches']} CFG branches)")
    return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------------------
def _is_df11(path: Path) -> bool:
    return df11_declared(path / "config.json") is not None


def _format_of(ema: SafetensorsHeader) -> tuple[str, str]:
    if "bagel_rt.format" in ema.metadata:
        return ema.metadata["bagel_rt.format"], f"{EMA_FILE} metadata"
    keys = ema.tensors.keys()
    if any(k.endswith(_NF4_STATE) for k in keys):
        return "nf4", "inferred from bitsandbytes NF4 keys"
    if any(k.endswith(".SCB") for k in keys):
        return "int8", "inferred from bitsandbytes INT8 keys"
    if any(k.endswith(".weight_scale") for k in keys):
        return "fp8", "inferred from FP8 weight_scale keys"
    dtypes = sorted({t.dtype for t in ema.tensors.values()})
    if len(dtypes) == 1 and dtypes[0] in _FLOAT_FORMATS:
        return _FLOAT_FORMATS[dtypes[0]], "inferred from tensor dtypes"
    return "mixed (" + ", ".join(dtypes) + ")", "inferred from tensor dtypes"


def _logical_numels(h: SafetensorsHeader) -> dict[str, int]:
    """Parameters per key: the logical weight size, 0 for quantization side tensors."""
    out, nf4 = {}, []
    for key, t in h.tensors.items():
        if key.endswith(_QUANT_AUX):
            out[key] = 0
        elif key + _NF4_STATE in h.tensors:
            nf4.append(key)
        else:
            out[key] = math.prod(t.shape)
    if nf4:
        from safetensors import safe_open

        with safe_open(str(h.path), framework="pt") as f:
            for key in nf4:
                try:
                    state = json.loads(bytes(f.get_tensor(key + _NF4_STATE).tolist()).decode("utf-8"))
                    out[key] = math.prod(int(s) for s in state["shape"])
                except (ValueError, KeyError, TypeError, RecursionError):  # unreadable: two 4-bit values a byte
                    out[key] = 2 * math.prod(h.tensors[key].shape)
    return out


def _files(path: Path) -> list[dict]:
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        entry = {"name": rel.as_posix(), "bytes": p.stat().st_size}
        if p.suffix == ".safetensors":
            h = read_header(p)
            dtypes: dict[str, int] = {}
            for t in h.tensors.values():
                dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
            entry.update(tensors=len(h.tensors), dtypes=dict(sorted(dtypes.items())), metadata=h.metadata)
        files.append(entry)
    return files


def _hyper(params: BagelParams) -> dict:
    d = asdict(params)
    d["llm"]["head_dim"] = params.llm.head_dim
    d["vae"]["ch_mult"] = list(params.vae.ch_mult)
    d.update(latent_downsample=params.latent_downsample, max_image_side=params.max_image_side,
             patch_latent_dim=params.patch_latent_dim)
    return d


def _df11_info(path: Path) -> dict:
    """DFloat11 layout: format and files only (the weights are compressed); hyper-parameters if readable."""
    files = _files(path)
    params = None
    try:
        ae = path / "vae" / AE_FILE if (path / "vae" / AE_FILE).is_file() else path / AE_FILE
        params = BagelParams(llm=llm_params_from_json(path / "llm_config.json"),
                             vit=vit_params_from_json(path / "vit_config.json"),
                             vae=vae_params_from_shapes(read_header(ae).shapes(), str(ae)))
    except CheckpointError:
        pass
    # the loader decodes every unit to bf16 (unless df11_resident): 2 bytes per weight, the VAE in fp32
    weights = 0
    parts: dict[str, dict[str, None]] = {}  # part -> its formats (DF11 units hold several parts' weights)
    for f in files:
        if f["name"].endswith(".safetensors"):
            vae = f["name"].startswith("vae/")
            for key, t in read_header(path / f["name"]).tensors.items():
                if key.endswith(".sign_mantissa") or not key.endswith(_DF11_BUFFERS):
                    weights += (4 if vae else 2) * math.prod(t.shape)
                unit = key.removesuffix(".encoded_exponent")
                if unit != key:
                    layer = _LAYER_UNIT.fullmatch(unit)
                    for part in ["llm_und", "llm_gen"] if layer else [part_of(f"{unit}.weight")]:
                        parts.setdefault(part, {})["df11"] = None
                elif len(t.shape) >= 2 and not key.endswith(_DF11_BUFFERS):
                    fmt = _FLOAT_FORMATS.get(t.dtype, t.dtype)
                    parts.setdefault("vae" if vae else part_of(key), {})[fmt] = None
    return {
        "path": str(path),
        "format": "df11",
        "format_source": "config.json has dfloat11_config",
        "part_formats": {p: parts[p] for p in PARTS if p in parts},
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "parameters": None,
        "component_bytes": None,
        "hyper_parameters": _hyper(params) if params else None,
        "memory_estimate": memory_estimate(params, weights) if params else None,
    }


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
