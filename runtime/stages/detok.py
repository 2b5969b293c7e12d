"""Detokenization for postprocess: token ids → UTF-8, incrementally for streams, plus AF3's prefix stripping.

Byte-level BPE tokens (Qwen2, AF3) map to exact byte strings, so a stream is detokenized without re-decoding
the whole answer: each chunk's bytes are appended to the request's pending bytes and only complete UTF-8
characters are released. Special tokens and ids past the tokenizer (padding rows of the embedding) give no text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies (GPT-2's convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Detokenizer:
    """ids → bytes from tokenizer.json (byte-level BPE); falls back to the tokenizers library otherwise."""

    def __init__(self, tokenizer_json: Path):
        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        decoder = spec.get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        self.byte_level = "ByteLevel" in kinds
        self.special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self._table: dict[int, bytes] = {}
        if self.byte_level:
            alphabet = _byte_level_alphabet()
            for tok, i in spec["model"]["vocab"].items():
                self._table[i] = bytes(alphabet[c] for c in tok) if all(c in alphabet for c in tok) else tok.encode()
            for t in spec.get("added_tokens", []):
                self._table[t["id"]] = t["content"].encode()
        else:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(tokenizer_json))

    def to_bytes(self, ids, skip_special: bool = True) -> bytes:
        if not self.byte_level:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special).encode()
        return b"".join(self._table.get(int(i), b"") for i in ids if not (skip_special and int(i) in self.special))

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.to_bytes(ids, skip_special).decode("utf-8", errors="replace")


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """(complete, tail): `tail` is an incomplete UTF-8 sequence at the end (at most 3 bytes), kept for later."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return (data, b"") if need <= back else (data[:-back], data[-back:])
    return data, b""


# AF3 answers transcription requests with a fixed framing (facts from transformers' AF3 processor).
TRANSCRIPTION_PREFIXES = (
    "The spoken content of the audio is",
    "The transcription of the audio is",
    "The content of the input audio is",
)


def strip_transcription_prefix(text: str) -> str:
    """'The spoken content of the audio is "hello".' → 'hello'; other text is returned stripped of spaces."""
    s = text.strip()
    for p in TRANSCRIPTION_PREFIXES:
        if s.startswith(p):
            s = s[len(p):].strip()
            break
    if s.endswith("."):
        s = s[:-1].strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1].strip()
    return s


@dataclass
class StreamState:
    """What postprocess keeps between the responses of one streamed request."""

    strip_prefix: bool = False
    pending: bytes = b""  # incomplete UTF-8 tail
    held: str = ""  # text held back while the prefix (or the closing '."') is undecided
    decided: bool = False
    quote: str = ""  # the opening quote dropped after the prefix; its closing twin is dropped at the end
    notices: list[str] = field(default_factory=list)
    tokens: int = 0  # answer tokens received so far (postprocess: the stream ends at max_tokens)

    def feed(self, chunk: bytes, final: bool) -> str:
        """Add a chunk of answer bytes; return the text that can be released now."""
        done, self.pending = split_utf8(self.pending + chunk)
        if final:
            done, self.pending = done + self.pending, b""
        text = done.decode("utf-8", errors="replace")
        if not self.strip_prefix:
            return text
        self.held += text
        if final:
            out = strip_transcription_prefix(self.held) if not self.decided else _strip_tail(self.held, self.quote)
            self.held = ""
            return out
        if not self.decided:
            s = self.held.lstrip()
            if any(p.startswith(s) for p in TRANSCRIPTION_PREFIXES):
                return ""  # still could be a prefix
            for p in TRANSCRIPTION_PREFIXES:
                if s.startswith(p):
                    rest = s[len(p):].lstrip()
                    if not rest:
                        return ""
                    s = rest
                    break
            if s[:1] in ("'", '"'):
                if len(s) == 1:
                    return ""
                self.quote, s = s[0], s[1:].lstrip()
            self.held = s
            self.decided = True
        # keep the last two characters back: they may be the closing quote and full stop
        out, self.held = self.held[:-2], self.held[-2:]
        return out


def _strip_tail(s: str, quote: str) -> str:
    s = s.rstrip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    if quote and s.endswith(quote):
        s = s[:-1].rstrip()
    return s
