"""The record format of a shard's journal: each record is framed by its length and CRC-32, so a
record cut short by a crash (or damaged) is recognised and the file truncated to the last whole one
before anything is appended; a JSON line torn mid-write would otherwise swallow the next record.

Record: 4 bytes little-endian payload length, 4 bytes little-endian CRC-32 of the payload, the
payload (UTF-8 JSON). Hand-written because it is 30 lines and no dependency of ours frames records
(RocksDB's WAL is internal to it).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

HEADER = struct.Struct('<II')
MAX_RECORD = 1 << 30  # a larger length is a damaged header, not a record


def encode(payload: dict) -> bytes:
    """One framed record."""
    data = json.dumps(payload, separators=(',', ':')).encode()
    return HEADER.pack(len(data), zlib.crc32(data)) + data


def read(path: Path) -> tuple[list[dict], int]:
    """The whole records of a journal file, and the byte length they span (the rest is torn)."""
    data = path.read_bytes() if path.exists() else b''
    records, position = [], 0
    while position + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, position)
        end = position + HEADER.size + length
        if length > MAX_RECORD or end > len(data):
            break
        payload = data[position + HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(json.loads(payload))
        except ValueError:
            break
        position = end
    return records, position


def truncate_to_whole_records(path: Path) -> int:
    """Cut a torn tail off a journal file (a crash mid-append), durably; returns the bytes cut."""
    if not path.exists():
        return 0
    _, whole = read(path)
    size = path.stat().st_size
    if whole < size:
        with open(path, 'r+b') as file:
            file.truncate(whole)
            file.flush()
            os.fsync(file.fileno())
    return size - whole
