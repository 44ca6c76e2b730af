"""Webdataset tar shards and DALI's index files: writer and format readers.

A shard holds, per sample, `<key>.jpg` and `<key>.cls` (ASCII decimal label), in that order, as
plain ustar members with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same samples give
the same bytes. Beside each shard, `<shard>.idx` is the index DALI's `fn.readers.webdataset` takes
(`index_paths`), in the v1.2 text format of DALI's own `wds2idx` tool: a first line
`v1.2 <number of samples>`, then one line per sample listing, for each member,
`<extension> <data offset> <size> <member name>`. We write it while writing the tar, since we know
every offset; `tests/test_convert.py` checks it against DALI's `wds2idx.IndexCreator`.

`read_member` is the one reader of a member's bytes at its .idx offset (the beton writer and `fastrsb
verify` use it); the loaders map whole shards instead (`layout.ShardBytes`).
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastrsb.errors import FastRSBError

INDEX_VERSION = "v1.2"
EXTENSIONS = ("jpg", "cls")


@dataclass(frozen=True)
class Member:
    key: str
    extension: str
    offset: int  # of the data, past the 512-byte header
    size: int


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for `_tarinfo(name, size)`, built directly: profiling put
    tarfile's `addfile` first among the converting process's own costs.
    Names over 100 bytes (a prefix split) and sizes beyond 11 octal digits go through tarfile."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not 0 <= size < 8**11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = b"".join((raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0" * 2, b"%011o\0" % size, b"00000000000\0",
                     b" " * 8, b"0", bytes(100), b"ustar\x0000", bytes(64 + 16 + 167)))
    return head[:148] + b"%06o\0" % sum(head) + head[155:]  # checksum over the header with 8 spaces in its place


class ShardWriter:
    """Write one shard and its index under temporary names; `close()` renames both into place.

    The .idx is renamed before the .tar, so a .tar under its final name always has its index.
    """

    def __init__(self, tar_path: str | os.PathLike):
        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_suffix(".idx")
        self._tmp_tar = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._fileobj = open(self._tmp_tar, "wb")
        self._offset = 0
        self.samples: list[list[Member]] = []

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        """Append `<key>.jpg` and `<key>.cls` as tarfile's `addfile` would (the same bytes)."""
        if "." in key or "/" in key:
            raise ValueError(f"webdataset key {key!r} must not contain '.' or '/'")
        members = []
        for extension, data in (("jpg", jpeg), ("cls", str(int(label)).encode("ascii"))):
            pad = -len(data) % tarfile.BLOCKSIZE
            self._fileobj.write(member_header(f"{key}.{extension}", len(data)))
            self._fileobj.write(data)
            self._fileobj.write(bytes(pad))
            members.append(Member(key, extension, self._offset + tarfile.BLOCKSIZE, len(data)))
            self._offset += tarfile.BLOCKSIZE + len(data) + pad
        self.samples.append(members)

    def _end(self) -> None:
        """tarfile's close: two zero blocks, then zeros up to a whole record (20 blocks)."""
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._fileobj.write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))

    def close(self) -> None:
        self._end()
        self._fileobj.flush()
        os.fsync(self._fileobj.fileno())
        self._fileobj.close()
        tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        with open(tmp_idx, "w") as f:
            f.write(format_index(self.samples))
        os.replace(tmp_idx, self.idx_path)
        os.replace(self._tmp_tar, self.tar_path)

    def abort(self) -> None:
        """Remove the partial shard, even when closing it fails (a full disk fails the closing write too)."""
        for close in (self._fileobj.close,):
            try:
                close()
            except OSError:
                pass
        self._tmp_tar.unlink(missing_ok=True)
        self.idx_path.with_name(self.idx_path.name + ".tmp").unlink(missing_ok=True)


def format_index(samples: list[list[Member]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{m.extension} {m.offset} {m.size} {m.key}.{m.extension}" for m in members))
    return "\n".join(lines) + "\n"


def read_index(idx_path: str | os.PathLike) -> list[dict[str, Member]]:
    """Parse a DALI webdataset index: one dict {extension: Member} per sample, in shard order."""
    idx_path = Path(idx_path)
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a DALI webdataset index {INDEX_VERSION} (first line {header})")
        samples = []
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if len(fields) % 4:
                raise ValueError(f"{idx_path}: malformed line {line!r}")
            members = {}
            for i in range(0, len(fields), 4):
                extension, offset, size, name = fields[i : i + 4]
                members[extension] = Member(name.split(".", 1)[0], extension, int(offset), int(size))
            samples.append(members)
    if len(samples) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def read_offsets(idx_path: str | os.PathLike, extension: str):
    """(offsets, sizes), int64 arrays, of each sample's `extension` member, in shard order.

    `read_index` without an object per member (the loaders' index reads every shard's .idx): a whole
    index is split at once. Checked as `read_index` checks (version, count, one `extension` member per
    sample)."""
    import numpy as np

    idx_path = Path(idx_path)
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a DALI webdataset index {INDEX_VERSION} (first line {header})")
        lines = [line for line in f.read().split("\n") if line.strip()]
    tokens = " ".join(lines).split()
    if len(lines) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(lines)}")
    if not lines:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len({line.count(" ") for line in lines}) > 1 or len(tokens) % (4 * len(lines)):  # members differ per sample
        members = [m[extension] if extension in m else None for m in read_index(idx_path)]
        if None in members:
            raise ValueError(f"{idx_path}: sample {members.index(None)} has no .{extension} member")
        return (np.asarray([m.offset for m in members], np.int64), np.asarray([m.size for m in members], np.int64))
    table = np.asarray(tokens).reshape(len(lines), -1, 4)
    hit = table[:, :, 0] == extension
    if not (hit.sum(axis=1) == 1).all():
        raise ValueError(f"{idx_path}: sample {int(np.argmin(hit.sum(axis=1) == 1))} has not exactly one "
                         f".{extension} member")
    try:
        return table[:, :, 1][hit].astype(np.int64), table[:, :, 2][hit].astype(np.int64)
    except ValueError as e:
        raise ValueError(f"{idx_path}: malformed offset or size ({e})") from None


def read_member(tar_path: str | os.PathLike, member: Member, f: BinaryIO | None = None) -> bytes:
    """The bytes of `member` (its offset and size from the shard's .idx) in the tar at `tar_path`, read
    through `f`, an open binary handle on that tar, when given (a caller reading many members keeps one
    open). FastRSBError naming the tar and the fix when the file ends before the member does."""
    if f is None:
        with open(tar_path, "rb") as f:
            return read_member(tar_path, member, f)
    f.seek(member.offset)
    data = f.read(member.size)
    if len(data) != member.size:
        raise FastRSBError(
            f"{tar_path}: member {member.key}.{member.extension} is cut short (its .idx puts {member.size} bytes at "
            f"offset {member.offset}, the file holds {len(data)} of them); delete {tar_path} and its .json record, "
            "then run the same fastrsb convert again to rewrite it")
    return data


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """The shards in a folder, in order (names sort by shard number)."""
    return sorted(Path(folder).glob("*.tar"))
