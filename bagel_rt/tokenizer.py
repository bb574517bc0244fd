"""Text tokenizer: the checkpoint's Qwen2 byte-level BPE through the ``tokenizers`` library.

``tokenizer.json`` is used when present; otherwise ``vocab.json`` + ``merges.txt`` (+ the added tokens of
``tokenizer_config.json``) are assembled into the same pipeline the slow Qwen2 tokenizer implements: NFC
normalisation, Qwen2's split regex, byte-level mapping, BPE. Input text is NFC-normalised here in every
case, as the official (slow) tokenizer does, so a ``tokenizer.json`` without a normalizer behaves the same.
Special tokens are looked up by string, never by id.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .errors import CheckpointError
from .model import SpecialTokens
from .validate import MAX_JSON_BYTES, read_bytes, read_json_object

# Qwen2's pre-tokenisation pattern (a fact of the published tokenizer, needed for the vocab+merges path).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_STRINGS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


class TextTokenizer:
    """Encode/decode text and frame segments as ``<|im_start|> ... <|im_end|>`` (no chat roles)."""

    def __init__(self, tok: Tokenizer, source: str):
        self.tok = tok
        ids = []
        for s in SPECIAL_STRINGS:
            i = tok.token_to_id(s)
            if i is None:
                raise CheckpointError(f"{source}: special token {s!r} is missing (BAGEL needs {SPECIAL_STRINGS})")
            ids.append(i)
        self.special = SpecialTokens(*ids)

    @classmethod
    def from_file(cls, path: Path) -> TextTokenizer:
        """Load one ``tokenizer.json`` file."""
        raw = read_bytes(path, MAX_JSON_BYTES, "tokenizer file")
        try:
            return cls(Tokenizer.from_str(raw.decode("utf-8")), str(path))
        except CheckpointError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exceptions for parse errors
            raise CheckpointError(f"{path}: cannot be read as a tokenizer ({str(e).splitlines()[0]})") from None

    @classmethod
    def from_dir(cls, path: Path) -> TextTokenizer:
        """Load from a checkpoint directory (``tokenizer.json``, else ``vocab.json`` + ``merges.txt``)."""
        tj = path / "tokenizer.json"
        if tj.exists() or tj.is_symlink():  # anything but a readable file there is an error naming it
            return cls.from_file(tj)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise CheckpointError(f"{path}: no tokenizer found (need tokenizer.json, or vocab.json + merges.txt)")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:
            msg = str(e).splitlines()[0]
            raise CheckpointError(f"{vocab}: cannot be read with {merges.name} ({msg})") from None
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        added = _added_tokens(path)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in added])
        for t, want in added:  # ids come from the order of addition: make sure they are the configured ones
            if want is not None and tok.token_to_id(t) != want:
                raise CheckpointError(f"{path / 'tokenizer_config.json'}: added token {t!r} has id {want}, but "
                                      f"vocab.json implies {tok.token_to_id(t)}; the files do not belong together")
        return cls(tok, str(path))

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (NFC-normalised), without framing tokens."""
        return self.tok.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids

    def frame(self, text: str) -> list[int]:
        """``[<|im_start|>] + encode(text) + [<|im_end|>]``: one text segment of a context."""
        return [self.special.bos, *self.encode(text), self.special.eos]

    def decode(self, ids: list[int]) -> str:
        """Decode ids, keeping special tokens (the reference splits on them afterwards)."""
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest token id (ids may have gaps, so this, not the count, must fit the embedding)."""
        return max(self.tok.get_vocab(with_added_tokens=True).values())



class TextDeltas:
    """The text of a stream of decoded token ids, piece by piece, as the ids arrive (streamed answers and think
    texts: the CLI prints the pieces, the server sends them as SSE chunks).

    It runs one token behind, because the reference's text leaves out the last prediction (the stop token, or the
    one that hit the limit), and holds back an incomplete multi-byte character. ``text`` is what was given out.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.shown = 0  # ids[:shown] are in text
        self.text = ""

    def push(self, token: int) -> str:
        """Take the next id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        ready = self.tok.decode(self.ids[self.shown:-1])
        if not ready or ready.endswith("\ufffd"):
            return ""
        self.text += ready
        self.shown = len(self.ids) - 1
        return ready

    def rest(self, final: str | None) -> str:
        """What the request's final text adds to the text given out (normally nothing)."""
        return final[len(self.text):] if final and final.startswith(self.text) else ""


def _added_tokens(path: Path) -> list[tuple[str, int | None]]:
    """Added tokens of ``tokenizer_config.json`` in id order, then any missing BAGEL framing token."""
    entries: list[tuple[str, int | None]] = []
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        table = read_json_object(cfg, "tokenizer config").get("added_tokens_decoder") or {}
        if not isinstance(table, dict):
            raise CheckpointError(f"{cfg}: 'added_tokens_decoder' is {type(table).__name__}, expected an object")
        for key in sorted(table, key=lambda k: int(k) if str(k).isdigit() else 1 << 62):
            entry = table[key]
            if isinstance(entry, dict) and entry.get("content"):
                entries.append((entry["content"], int(key) if str(key).isdigit() else None))
    names = {n for n, _ in entries}
    entries += [(s, None) for s in SPECIAL_STRINGS if s not in names]
    return entries
