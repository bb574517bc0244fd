"""DFloat11 weights kept compressed on the device (``df11_resident=True``), decoded unit by unit just before use.

A DF11 *unit* is one module's weights compressed together (an LLM decoder layer: both experts' 14 Linears,
466 M weights at full size; a ViT layer; ``lm_head``; the token embedding). Compressed, a unit takes ~70% of its
bf16 bytes (on a GPU plus its windows' code counts, :func:`bagel_rt.quant.df11_window_counts`: one byte per 8
code bytes, so that each decode skips the counting pass, and its first lookup level joined with the code lengths,
:func:`bagel_rt.quant.df11_first_level`, 1 KB, so that a short code costs one table load on the decode loop's
serial chain instead of two); decoded (:func:`bagel_rt.quant.df11_decode`,
bit-identical to the bf16 original) it goes into one of two shared bf16 *slots*, whose slices are the unit's
modules' ``weight`` attributes (fixed views: a unit's weights always live at the same addresses, which is what
a CUDA graph needs).

Two ways a unit gets decoded:

* the torch path (prefill, text decoding, the ViT): a forward pre-hook on the unit's module decodes it on the
  current stream just before the module runs (everything is sequential there, so any slot would do);
* the packed denoiser (:class:`bagel_rt.fast.PackedDenoiser`): :meth:`ResidentDF11.decode` explicitly, one LLM
  layer ahead on a decode stream. The LLM layers still compressed alternate between the two slots, so layer
  i+1 decodes into the other slot while layer i computes (double buffering); the decode of a slot waits until
  the layer that last used it is done (events), and the forward's streams all join at its end, so the whole
  thing is captured in the denoiser's CUDA graph (the kernel allocates nothing and never syncs with the host).

Under a memory budget (:func:`bagel_rt.placement.limit_gpu_memory`) units can be decoded for good
(:meth:`ResidentDF11.keep_decoded`): their modules get ordinary bf16 parameters and the compressed buffers are
dropped (+0.3 GB per LLM layer at full size: 932 MB decoded against ~650 MB compressed). The placement keeps as
many layers decoded as the budget allows (computed from sizes, no measurement), and units of modules that
live on the CPU under a budget (the embedding, the ViT) are decoded for good before they move there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .quant import df11_decode, df11_decode_ref, df11_first_level, df11_window_counts
from .quant.exp4 import exp4_decode, exp4_decode_ref, exp4_encode, is_exp4

SLOTS = 2  # shared decode buffers: layer i+1 decodes into one while layer i computes from the other
#: the form a unit is kept in: "huffman" (DF11's own buffers, decoded by quant.df11_decode: ~70% of bf16) or
#: "exp4" (transcoded once when the unit is added, quant.exp4: ~75% of bf16, decoded at memory speed; bits
#: identical either way). Exp4 is the default: a 1024^2 t2i under a 24 GiB budget (``budget_memory.py --runs
#: df11@24:t2i [--df11-form exp4]``, random weights of the 7B configuration, H100, 09db864, each with its bf16
#: run in the same process) took 10.33 s against bf16's 9.57 (1.079x) in Exp4 and 16.36 s against 9.36 (1.748x)
#: in the Huffman form, bits identical to bf16 in both; peak 22.59 GiB against 21.24 (resident 21.15 against
#: 19.80). Budgets between the two forms' needs take ``df11_form="huffman"`` (bagel_rt.load). Random weights
#: escape the 15-exponent window rarely (1.5e-4); a checkpoint whose layers escape more grows and decodes slower.
FORMS = ("huffman", "exp4")
DEFAULT_FORM = "exp4"


@dataclass
class Unit:
    """One compressed unit: its buffers (``luts``, ``encoded_exponent``, ... on the device), the modules whose
    ``weight`` it holds with their shapes, the split points of its decoded elements, and its slot."""

    name: str
    buffers: dict[str, Tensor]
    targets: list[tuple[nn.Module, tuple[int, ...]]]
    split: list[int]
    slot: int = 0
    hook: object = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return self.buffers["sign_mantissa"].numel()

    def compressed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


class ResidentDF11:
    """The compressed units of one model on ``device``, and the two slots they decode into."""

    def __init__(self, device: torch.device, form: str | None = None) -> None:
        self.device = device
        self.form = form or DEFAULT_FORM
        assert self.form in FORMS, f"form must be one of {FORMS}, got {self.form!r}"
        self.units: dict[str, Unit] = {}
        self.slots: list[Tensor] = [torch.empty(0, dtype=torch.bfloat16, device=device) for _ in range(SLOTS)]
        self.model: nn.Module | None = None

    # -- building ---------------------------------------------------------------------------------------------
    def add(self, model: nn.Module, unit: str, weights: list[tuple[str, tuple[int, ...]]],
            buffers: dict[str, Tensor], split: list[int]) -> None:
        """Take over the unit ``unit`` (module name) of ``model``: the weights ``weights`` (names, shapes) stop
        being parameters and become views of a slot (bound by :meth:`layout`, once every unit is in)."""
        targets = []
        for w, shape in weights:
            mod = model.get_submodule(w.rpartition(".")[0])
            del mod.weight  # from now on a plain attribute: a view of a slot
            targets.append((mod, tuple(shape)))
        if self.form == "exp4":
            buffers = _transcode(buffers)
        elif buffers["sign_mantissa"].device.type == "cuda":  # decoded every step: count its windows once, and
            # join its first lookup level with the code lengths (one table load per short code in the loop)
            buffers = {**buffers, "window_counts": df11_window_counts(buffers),
                       "first_level": df11_first_level(buffers)}
        u = Unit(unit, buffers, targets, split)
        u.hook = model.get_submodule(unit).register_forward_pre_hook(lambda mod, args: self.decode(u))
        self.units[unit] = u
        self.model = model

    def layer_units(self) -> list[Unit | None]:
        """The unit of each LLM decoder layer, in layer order (None: decoded for good, or not compressed)."""
        layers = self.model.language_model.model.layers
        return [self.units.get(f"language_model.model.layers.{i}") for i in range(len(layers))]

    def layout(self) -> None:
        """Assign slots (the compressed LLM layers alternate, in layer order; every other unit takes slot 0),
        size each slot to its largest unit and bind every unit's weights to views of its slot."""
        layers = [u for u in self.layer_units() if u is not None]
        for u in self.units.values():
            u.slot = 0
        for k, u in enumerate(layers):
            u.slot = k % SLOTS
        for s in range(SLOTS):
            n = max((u.numel for u in self.units.values() if u.slot == s), default=0)
            if self.slots[s].numel() != n:
                self.slots[s] = torch.empty(0, dtype=torch.bfloat16, device=self.device)  # free before growing
                self.slots[s] = torch.empty(n, dtype=torch.bfloat16, device=self.device)
        for u in self.units.values():
            _bind(u, self.slots[u.slot][: u.numel], parameters=False)

    # -- decoding ---------------------------------------------------------------------------------------------
    def decode(self, u: Unit) -> None:
        """Decode ``u`` into its slot on the current stream (no allocation, no host synchronisation)."""
        _decode(u.buffers, self.slots[u.slot][: u.numel])

    def keep_decoded(self, name: str) -> int:
        """Decode the unit ``name`` for good: its modules get bf16 parameters, the compressed buffers and the
        hook go. Returns the compressed bytes freed. Call :meth:`layout` afterwards (slots may shrink)."""
        u = self.units.pop(name)
        out = torch.empty(u.numel, dtype=torch.bfloat16, device=self.device)
        _decode(u.buffers, out)
        _bind(u, out, parameters=True)
        u.hook.remove()
        freed = u.compressed_bytes()
        u.buffers.clear()
        return freed

    def keep_decoded_under(self, prefix: str) -> None:
        """Decode for good every unit whose module is ``prefix`` or inside it (e.g. modules moving to the CPU)."""
        for name in [n for n in self.units if n == prefix or n.startswith(prefix + ".")]:
            self.keep_decoded(name)
        self.layout()

    def layer_cost(self) -> int:
        """Bytes one LLM layer costs decoded for good over compressed (its bf16 weights minus its buffers)."""
        u = next((u for u in self.layer_units() if u is not None), None)
        return 0 if u is None else 2 * u.numel - u.compressed_bytes()

    def nbytes(self) -> int:
        """Device bytes of the compressed buffers and the slots."""
        return (sum(u.compressed_bytes() for u in self.units.values())
                + sum(s.numel() * s.element_size() for s in self.slots))


def _decode(buffers: dict[str, Tensor], out: Tensor) -> None:
    """Decode a unit (either form) into ``out`` [numel] bf16: the Triton kernels on CUDA, the references
    elsewhere."""
    cuda = out.device.type == "cuda"
    if is_exp4(buffers):
        (exp4_decode if cuda else exp4_decode_ref)(buffers, out)
    else:
        (df11_decode if cuda else df11_decode_ref)(buffers, out)


def _transcode(buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """The Exp4 buffers of a DF11 unit (decoded once here; a bf16 temporary of the unit's size), with its
    ``split_positions`` if any."""
    sm = buffers["sign_mantissa"]
    out = torch.empty(sm.numel(), dtype=torch.bfloat16, device=sm.device)
    _decode(buffers, out)
    new = exp4_encode(out, sm)
    if "split_positions" in buffers:
        new["split_positions"] = buffers["split_positions"]
    return new


def _bind(u: Unit, flat: Tensor, parameters: bool) -> None:
    """Point the unit's modules' weights at slices of ``flat`` [numel] (as bf16 parameters when ``parameters``,
    which module moves carry, else as plain attributes)."""
    for (mod, shape), part in zip(u.targets, torch.tensor_split(flat, u.split)):
        w = part.view(shape)
        if parameters:
            mod.weight = nn.Parameter(w, requires_grad=False)
        else:
            mod.weight = w


class LayerPrefetch:
    """The packed denoiser's decode schedule of the compressed LLM layers within one forward.

    The compressed layers c0, c1, c2, ... alternate between the two slots. At the forward's start c0 and c1 are
    decoded; when layer c_k is done (on every stream that used its weights), c_{k+2} decodes into the slot c_k
    used, so a decode runs one layer ahead of the compute. On CUDA the decodes run on their own stream, ordered
    by events (a layer waits for its decode; a decode waits for the layer that last read its slot) and joined at
    the forward's end, so a CUDA graph capture records the whole schedule. Without CUDA each decode simply runs
    in that order.

    Args:
        store: the model's :class:`ResidentDF11`.
        device: the model's device (a decode stream on CUDA).
    """

    def __init__(self, store: ResidentDF11, device: torch.device) -> None:
        self.store = store
        self.units = store.layer_units()
        order = [i for i, u in enumerate(self.units) if u is not None]
        #: compressed layer -> the compressed layer that decodes into its slot when it is done
        self.after_done = {a: b for a, b in zip(order, order[SLOTS:])}
        self.first = order[:SLOTS]
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" and order else None
        self.ready: dict[int, object] = {}  # layer -> the event of its decode (CUDA)

    def start(self) -> None:
        """At the forward's start: the decode stream follows everything queued so far; decode c0 and c1."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
        for i in self.first:
            self._issue(i, [])

    def before(self, i: int, side) -> None:
        """Before layer ``i``'s work: the current stream and the marker stream ``side`` (or None) wait for its
        decode."""
        ev = self.ready.get(i) if self.units[i] is not None else None
        if ev is None:
            return
        torch.cuda.current_stream().wait_event(ev)
        if side is not None:
            side.wait_event(ev)

    def after(self, i: int, side) -> None:
        """After layer ``i``'s work was queued on the current stream and ``side``: its slot's next user decodes
        once both are done."""
        if self.units[i] is None or i not in self.after_done:
            return
        events = []
        if self.stream is not None:
            for s in (torch.cuda.current_stream(), side):
                if s is not None:
                    ev = torch.cuda.Event()
                    ev.record(s)
                    events.append(ev)
        self._issue(self.after_done[i], events)

    def finish(self) -> None:
        """At the forward's end: the current stream joins the decode stream (a capture must end joined)."""
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)

    def _issue(self, j: int, wait: list) -> None:
        u = self.units[j]
        if self.stream is None:
            self.store.decode(u)
            return
        with torch.cuda.stream(self.stream):
            for ev in wait:
                self.stream.wait_event(ev)
            self.store.decode(u)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.ready[j] = ev
