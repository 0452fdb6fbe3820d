"""zstd packing of a model file with a dictionary trained on samples of that file, verified by a full round trip.

Quantized weights are close to random bytes and barely compress; llama.cpp cannot map a ``.zst`` file either.
The packed file is a transfer format: the uncompressed GGUF stays the serving artifact.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass
class PackResult:
    original_bytes: int
    packed_bytes: int
    dict_bytes: int
    ratio: float  # original / (packed + dictionary)
    level: int
    compress_mb_s: float
    decompress_mb_s: float
    sha256: str
    round_trip_ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def train_dictionary(path: Path, dict_size: int, sample_size: int = 4096, samples: int = 2000,
                     seed: int = 0) -> bytes:
    """A zstd dictionary of ``dict_size`` bytes trained on ``samples`` random slices of the file."""
    import zstandard as zstd

    size = path.stat().st_size
    rng = random.Random(seed)
    picks = []
    with open(path, "rb") as f:
        for _ in range(samples):
            f.seek(rng.randrange(0, max(1, size - sample_size)))
            picks.append(f.read(sample_size))
    return zstd.train_dictionary(dict_size, picks).as_bytes()


def pack(path: Path, out: Path, dict_out: Path, level: int = 10, dict_size: int = 128 * 1024) -> PackResult:
    """Compress ``path`` to ``out`` with a trained dictionary (saved to ``dict_out``), decompress it again and
    compare sha256. Streams, so files larger than memory work."""
    import zstandard as zstd

    dictionary = train_dictionary(path, dict_size)
    dict_out.write_bytes(dictionary)
    zdict = zstd.ZstdCompressionDict(dictionary)
    started = time.monotonic()
    with open(path, "rb") as src, open(out, "wb") as dst:
        zstd.ZstdCompressor(level=level, dict_data=zdict, write_checksum=True).copy_stream(src, dst, read_size=CHUNK)
    compress_s = time.monotonic() - started
    want = _sha256(path)
    started = time.monotonic()
    got = unpack_sha256(out, dict_out)
    decompress_s = time.monotonic() - started
    original, packed = path.stat().st_size, out.stat().st_size
    mb = original / 1e6
    return PackResult(original_bytes=original, packed_bytes=packed, dict_bytes=len(dictionary),
                      ratio=original / (packed + len(dictionary)), level=level,
                      compress_mb_s=mb / max(compress_s, 1e-9), decompress_mb_s=mb / max(decompress_s, 1e-9),
                      sha256=want, round_trip_ok=got == want)


def unpack(packed: Path, dict_path: Path, out: Path) -> Path:
    """Decompress a packed file (with its dictionary) to ``out``."""
    import zstandard as zstd

    zdict = zstd.ZstdCompressionDict(dict_path.read_bytes())
    with open(packed, "rb") as src, open(out, "wb") as dst:
        zstd.ZstdDecompressor(dict_data=zdict).copy_stream(src, dst, write_size=CHUNK)
    return out


def unpack_sha256(packed: Path, dict_path: Path) -> str:
    """sha256 of the decompressed bytes, streamed (nothing written to disk)."""
    import zstandard as zstd

    zdict = zstd.ZstdCompressionDict(dict_path.read_bytes())
    h = hashlib.sha256()
    with open(packed, "rb") as src:
        reader = zstd.ZstdDecompressor(dict_data=zdict).stream_reader(src, read_size=CHUNK)
        while block := reader.read(CHUNK):
            h.update(block)
    return h.hexdigest()
