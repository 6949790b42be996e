"""Candidate embeddings on disk, for corpora larger than memory: shards written resumably and
checksummed, read back tile by tile by the "tiles" search engine (hybridfast.evaluation.tiles).

A shard folder holds `shard-00000.npy`, `shard-00001.npy`, ... (plain .npy files: float32, or
the bfloat16 bits as uint16 for precision "bf16"; `np.load(path, mmap_mode="r")` maps one) and
`manifest.json`: the format, dim, precision, rows per shard, the expected total, a fingerprint
of what was encoded (the texts), and per shard its rows and sha256. A shard is written to a
temporary, fsynced, hashed while written and renamed; the manifest is rewritten (atomically)
after each one. So a killed writer leaves complete shards and the manifest that lists them:
`ShardWriter` on the same folder with the same settings resumes at `rows_done`. Other
settings or a changed fingerprint are refused (never mixed, never deleted), as is a non-empty
folder without a manifest.

Reading: `ShardedTiles` checks the manifest is complete and (by default) every shard's
sha256, then streams tiles with positioned reads into one reused buffer. Reads, not a memory
map, on purpose: mapped pages that were touched count in the process's resident set until
the kernel drops them, so a sweep over a mapped 15 GB corpus would show 15 GB RSS; read pages
stay in the page cache, which the kernel reclaims freely. The relevant candidates' rows
(a few per query) are read one by one the same way.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from hybridfast import rules
from hybridfast.evaluation.tiles import bf16_bits, bf16_to_fp32

FORMAT = "hybridfast-shards/1"
MANIFEST = "manifest.json"
SHARD_ROWS = 1 << 20  # 1.5 GiB of float32 at D = 384: large reads, few files
_PRECISION_DTYPE = {"fp32": np.dtype("<f4"), "bf16": np.dtype("<u2")}


def _manifest_path(folder):
    return Path(folder) / MANIFEST


def read_manifest(folder):
    path = _manifest_path(folder)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no readable shard manifest ({path.name}): {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: not a hybridfast shard folder (format {manifest.get('format')!r})")
    return manifest


class _HashingFile:
    """A binary file that hashes what is written to it (np.save writes through .write)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data):
        self.sha.update(data)
        return self.f.write(data)


class ShardWriter:
    """Append embeddings [n, D] in order; every `shard_rows` rows become one checksummed shard.

    folder: new, empty, or an unfinished folder of this writer with the same settings (resumed:
    `rows_done` rows are there; append the rest). total: the rows to expect. fingerprint: a
    string naming what is encoded (encode_to_shards uses a hash of the texts); a folder written
    for another fingerprint is refused."""

    def __init__(self, folder, total, precision="fp32", shard_rows=SHARD_ROWS, fingerprint="", dim=None):
        rules.check_int("total", total, 1)
        rules.check_int("shard_rows", shard_rows, 1)
        rules.check_choice("precision", precision, tuple(_PRECISION_DTYPE))
        self.folder = Path(folder)
        want = dict(format=FORMAT, total=int(total), precision=precision, shard_rows=int(shard_rows),
                    fingerprint=str(fingerprint))
        self.manifest = self._open(want, dim)
        self.pending = []

    def _open(self, want, dim):
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"folder {self.folder}: exists and is not a folder")
        if _manifest_path(self.folder).exists():
            have = read_manifest(self.folder)
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if dim is not None and have.get("dim") not in (None, dim):
                diff["dim"] = (have.get("dim"), dim)
            if diff:
                raise ValueError(f"folder {self.folder}: holds shards written with other settings "
                                 f"(have, want: {diff}); use a new folder")
            for tmp in self.folder.glob(".shard-*.tmp"):  # a killed writer's partial shard
                tmp.unlink()
            return have
        if self.folder.exists() and any(self.folder.iterdir()):
            raise ValueError(f"folder {self.folder}: not empty and not a shard folder; use a new or empty folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = dict(want, dim=dim, shards=[], complete=False)
        rules.atomic_write_json(_manifest_path(self.folder), manifest)
        return manifest

    @property
    def rows_done(self):
        """Rows in complete shards: where a resumed writer continues."""
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def complete(self):
        return bool(self.manifest["complete"])

    def append(self, embeddings):
        x = np.asarray(embeddings.detach().float().cpu() if hasattr(embeddings, "detach") else embeddings)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"embeddings must be a float array [n, D], got {x.dtype} {x.shape}")
        dim = self.manifest.get("dim")
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f"embeddings have dimension {x.shape[1]}, the shards {dim}")
        if not np.isfinite(x).all():
            raise ValueError("embeddings hold NaN or infinite values")
        if self.rows_done + sum(len(p) for p in self.pending) + len(x) > self.manifest["total"]:
            raise ValueError(f"more rows than total={self.manifest['total']}")
        self.manifest["dim"] = int(x.shape[1])
        self.pending.append(x.astype(np.float32, copy=False))
        rows = self.manifest["shard_rows"]
        while sum(len(p) for p in self.pending) >= rows:
            block = np.concatenate(self.pending)
            self._write_shard(block[:rows])
            self.pending = [block[rows:]] if len(block) > rows else []

    def close(self):
        """Write what is pending as the last shard; the folder is complete once `total` rows are in."""
        if self.pending:
            self._write_shard(np.concatenate(self.pending))
            self.pending = []
        return self.complete

    def _write_shard(self, block):
        name = f"shard-{len(self.manifest['shards']):05d}.npy"
        data = bf16_bits(block) if self.manifest["precision"] == "bf16" else block
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=str(self.folder))
        try:
            with os.fdopen(fd, "wb") as f:
                hashed = _HashingFile(f)
                np.lib.format.write_array(hashed, np.ascontiguousarray(data), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            rules.follow_umask(tmp)
            os.replace(tmp, self.folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        rules.fsync_dir(self.folder)
        self.manifest["shards"].append(dict(file=name, rows=int(len(block)), sha256=hashed.sha.hexdigest()))
        self.manifest["complete"] = self.rows_done == self.manifest["total"]
        rules.atomic_write_json(_manifest_path(self.folder), self.manifest)


class ShardedTiles:
    """A complete shard folder as the candidate source of the tiles engine (same interface as
    tiles.ArrayTiles: n, dim, shape, precision, tile(), rows())."""

    def __init__(self, folder, verify=True):
        self.folder = Path(folder)
        parts = part_folders(self.folder)
        manifests = [(f, read_manifest(f)) for f in (parts or [self.folder])]
        for f, m in manifests:
            if not m["complete"]:
                done = sum(s["rows"] for s in m["shards"])
                raise ValueError(f"{f}: incomplete shards ({done} of {m['total']} rows); "
                                 "resume writing them first")
        if len({(m["precision"], m["dim"]) for _, m in manifests}) != 1:
            raise ValueError(f"{self.folder}: its parts differ in precision or dimension")
        m = manifests[0][1]
        self.precision, self.dim = m["precision"], int(m["dim"])
        self.n = sum(int(m["total"]) for _, m in manifests)
        self.shape = (self.n, self.dim)
        self.needs_buffer = True  # tiles are read into the engine's buffer
        self.dtype = _PRECISION_DTYPE[self.precision]
        shards = [(f / s["file"], s) for f, m in manifests for s in m["shards"]]  # parts in rank order
        self.starts = np.cumsum([0] + [s["rows"] for _, s in shards])
        self.maps, self.files, self.data_offsets = [], [], []
        for path, s in shards:
            if verify and rules.sha256_file(path) != s["sha256"]:
                raise ValueError(f"{path}: checksum mismatch (the shard changed after it was written)")
            arr = np.load(path, mmap_mode="r")
            if arr.shape != (s["rows"], self.dim) or arr.dtype != self.dtype:
                raise ValueError(f"{path}: holds {arr.dtype} {arr.shape}, the manifest says "
                                 f"{self.dtype} {(s['rows'], self.dim)}")
            self.maps.append(arr)
            self.data_offsets.append(arr.offset)
            self.files.append(open(path, "rb", buffering=0))
        self._bits = None

    def close(self):
        for f in self.files:
            f.close()
        self.files = []

    def _read(self, start, end, out):
        """Rows [start, end) of the stored array into `out` (dtype of the shards)."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        row, width = start, self.dim * self.dtype.itemsize
        for i in range(first, len(self.maps)):
            if row >= end:
                break
            stop = min(end, int(self.starts[i + 1]))
            view = memoryview(out[row - start:stop - start]).cast("B")
            got = os.preadv(self.files[i].fileno(), [view], self.data_offsets[i] + (row - self.starts[i]) * width)
            if got != view.nbytes:
                raise OSError(f"{self.folder / self.files[i].name}: short read (the file was truncated)")
            row = stop
        return out[:end - start]

    def tile(self, start, end, buf):
        if self.precision == "bf16":
            if self._bits is None or len(self._bits) < end - start:
                self._bits = np.empty((max(end - start, len(buf)), self.dim), np.uint16)
            return bf16_to_fp32(self._read(start, end, self._bits), buf[:end - start])
        return self._read(start, end, buf)

    def rows(self, cols):
        """float32 vectors of the candidate columns `cols` (any shape), one positioned read each:
        gathering through the memory maps left ~0.9x the shards' bytes resident (fault-around and
        readahead of mapped pages count in RSS; measured at 1M x 384 bf16)."""
        flat = np.asarray(cols).ravel()
        out = np.empty((flat.size, self.dim), self.dtype)
        for j, col in enumerate(flat.tolist()):
            self._read(col, col + 1, out[j:j + 1])
        if self.precision == "bf16":
            out = bf16_to_fp32(out, np.empty(out.shape, np.float32))
        return out.reshape(np.shape(cols) + (self.dim,))


def texts_fingerprint(texts):
    """sha256 of the texts in order: a resumed shard folder must hold the same corpus."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def encode_to_shards(encode_passages, texts, folder, precision="fp32", shard_rows=SHARD_ROWS, progress=None):
    """Encode `texts` shard by shard into `folder` (resuming a killed run where it stopped) and
    return the complete ShardedTiles. encode_passages: list[str] -> [n, D] (Encoder.encode_passages)."""
    _write_shards(encode_passages, list(texts), folder, precision, shard_rows, progress)
    return ShardedTiles(folder)


def _write_shards(encode_passages, texts, folder, precision, shard_rows, progress):
    writer = ShardWriter(folder, len(texts), precision, shard_rows, texts_fingerprint(texts))
    for s in range(writer.rows_done, len(texts), shard_rows):
        writer.append(encode_passages(texts[s:s + shard_rows]))
        if progress is not None:
            progress.update(min(len(texts), s + shard_rows) - s)
    writer.close()


# ----------------------------------------------------------------------------- data-parallel writing

PART = "part-{rank:05d}-of-{world:05d}"


def part_folders(folder):
    """The parts of a folder written by `world` data-parallel ranks, in rank order ([] for a folder
    written by one process). Parts of two different world sizes are refused."""
    parts = sorted(Path(folder).glob("part-*-of-*")) if Path(folder).is_dir() else []
    worlds = {p.name.rsplit("-of-", 1)[1] for p in parts}
    if len(worlds) > 1:
        raise ValueError(f"{folder}: holds parts of several runs ({sorted(worlds)} ranks); use a new folder")
    return parts


def rank_slice(n, rank, world):
    """[start, end) of rank's contiguous share of n rows (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def encode_to_shards_parallel(encode_passages, texts, folder, rank, world, precision="fp32",
                              shard_rows=SHARD_ROWS, progress=None, barrier=None):
    """This rank's contiguous share of `texts` into folder/part-RANK-of-WORLD (resumable like
    encode_to_shards); after `barrier()` (every rank done) rank 0 gets the whole corpus as one
    ShardedTiles, parts concatenated in rank order, so the search sees the single-process rows.
    Other ranks get None."""
    texts = list(texts)
    if Path(folder).is_dir() and (Path(folder) / MANIFEST).exists():
        raise ValueError(f"{folder}: holds shards of a single-process run; use a new folder for {world} ranks")
    start, end = rank_slice(len(texts), rank, world)
    part = Path(folder) / PART.format(rank=rank, world=world)
    if end > start:  # written only: rank 0 opens (and checksums) every part once, below
        _write_shards(encode_passages, texts[start:end], part, precision, shard_rows, progress)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    if any(rank_slice(len(texts), r, world)[1] > rank_slice(len(texts), r, world)[0]
           and not (Path(folder) / PART.format(rank=r, world=world)).is_dir() for r in range(world)):
        raise ValueError(f"{folder}: a rank's part is missing after the barrier")
    return ShardedTiles(folder)
