"""A baseline JPEG's brightness at 1/8 scale, with no imaging library: the mean of every 8x8 luma block is its
DC coefficient (mean = DC * quant[0] / 8 + 128), so decoding only the entropy-coded scan, skipping the AC
coefficients, gives a thumbnail of the thumbnail. Enough to tell two pictures apart in the tests; refuses
progressive and arithmetic-coded files (say so rather than guess)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

_BYTE_BITS = [f"{i:08b}" for i in range(256)]


def _segments(data: bytes, start: int) -> tuple[list[bytes], int]:
    """The entropy-coded data after SOS at `start`, unstuffed (FF00 -> FF), split at restart markers;
    returns (segments, index of the marker that ends the scan)."""
    segs, cur, i = [], bytearray(), start
    while i < len(data):
        b = data[i]
        if b != 0xFF:
            cur.append(b)
            i += 1
            continue
        nxt = data[i + 1]
        if nxt == 0x00:
            cur.append(0xFF)
            i += 2
        elif 0xD0 <= nxt <= 0xD7:                     # RSTn: a new interval
            segs.append(bytes(cur))
            cur = bytearray()
            i += 2
        elif nxt == 0xFF:                              # fill byte
            i += 1
        else:
            break
    segs.append(bytes(cur))
    return segs, i


def _huffman(counts, symbols) -> dict[str, int]:
    table, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            table[format(code, f"0{length}b")] = symbols[k]
            code += 1
            k += 1
        code <<= 1
    return table


def luma_blocks(path: str | Path) -> np.ndarray:
    """[rows, cols] mean luma (0..255) of each 8x8 block of a baseline JPEG, cropped to the picture."""
    data = Path(path).read_bytes()
    if data[:2] != b"\xff\xd8":
        raise ValueError(f"{path}: not a JPEG")
    quant, dc_tables, ac_tables, restart = {}, {}, {}, 0
    comps, width, height = None, 0, 0
    i = 2
    while i < len(data):
        if data[i] != 0xFF:
            raise ValueError(f"{path}: bad marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        seg = data[i + 4:i + 2 + length]
        if marker == 0xDB:                                   # DQT
            j = 0
            while j < len(seg):
                pq, tq = seg[j] >> 4, seg[j] & 15
                quant[tq] = int.from_bytes(seg[j + 1:j + 3], "big") if pq else seg[j + 1]
                j += 1 + 64 * (2 if pq else 1)
        elif marker in (0xC0, 0xC1):                         # baseline / extended Huffman
            height, width = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
            comps = [dict(id=seg[6 + 3 * k], h=seg[7 + 3 * k] >> 4, v=seg[7 + 3 * k] & 15, tq=seg[8 + 3 * k])
                     for k in range(seg[5])]
        elif marker in (0xC2, 0xC3) or 0xC5 <= marker <= 0xCF and marker not in (0xC8, 0xCC):
            raise ValueError(f"{path}: only baseline JPEGs are read here (SOF marker {marker:#x})")
        elif marker == 0xC4:                                 # DHT
            j = 0
            while j < len(seg):
                tc, th = seg[j] >> 4, seg[j] & 15
                counts = list(seg[j + 1:j + 17])
                n = sum(counts)
                (ac_tables if tc else dc_tables)[th] = _huffman(counts, list(seg[j + 17:j + 17 + n]))
                j += 17 + n
        elif marker == 0xDD:                                 # DRI
            restart = int.from_bytes(seg[0:2], "big")
        elif marker == 0xDA:                                 # SOS: decode, then stop
            ns = seg[0]
            sel = {seg[1 + 2 * k]: (seg[2 + 2 * k] >> 4, seg[2 + 2 * k] & 15) for k in range(ns)}
            scan = [c for c in comps if c["id"] in sel]
            if len(scan) != len(comps):
                raise ValueError(f"{path}: multi-scan JPEGs are not read here")
            segs, _ = _segments(data, i + 2 + length)
            return _decode(segs, scan, sel, dc_tables, ac_tables, quant, restart, width, height)
        elif marker == 0xD9:
            break
        i += 2 + length
    raise ValueError(f"{path}: no image data")


def _decode(segs, comps, sel, dc_tables, ac_tables, quant, restart, width, height):
    hmax, vmax = max(c["h"] for c in comps), max(c["v"] for c in comps)
    mcux, mcuy = -(-width // (8 * hmax)), -(-height // (8 * vmax))
    luma = comps[0]
    out = np.zeros((mcuy * luma["v"], mcux * luma["h"]), np.float64)
    q0 = quant[luma["tq"]]
    plan = [(c is luma, c["h"], c["v"], dc_tables[sel[c["id"]][0]], ac_tables[sel[c["id"]][1]]) for c in comps]
    per_seg = restart or mcux * mcuy
    mcu = 0
    for seg in segs:
        bits = "".join(map(_BYTE_BITS.__getitem__, seg))
        pos, pred = 0, [0] * len(plan)
        for _ in range(per_seg):
            if mcu >= mcux * mcuy:
                break
            my, mx = divmod(mcu, mcux)
            for ci, (is_luma, h, v, dct, act) in enumerate(plan):
                for by in range(v):
                    for bx in range(h):
                        s, pos = _symbol(bits, pos, dct, "DC")
                        diff = 0
                        if s:
                            raw = bits[pos:pos + s]
                            diff = int(raw, 2) if raw[0] == "1" else int(raw, 2) - (1 << s) + 1
                            pos += s
                        pred[ci] += diff
                        if is_luma:
                            out[my * v + by, mx * h + bx] = pred[ci] * q0 / 8 + 128
                        k = 1
                        while k < 64:                     # skip the AC coefficients
                            rs, pos = _symbol(bits, pos, act, "AC")
                            r, s = rs >> 4, rs & 15
                            if s == 0:
                                if r != 15:
                                    break
                                k += 16
                                continue
                            pos += s
                            k += r + 1
            mcu += 1
    return np.clip(out[:-(-height // 8), :-(-width // 8)], 0, 255)


def _symbol(bits: str, pos: int, table: dict, what: str) -> tuple[int, int]:
    """The Huffman symbol at `pos` of the bit string and the position after its code."""
    for length in range(1, 17):
        code = bits[pos:pos + length]
        if code in table:
            return table[code], pos + length
    raise ValueError(f"corrupt JPEG scan ({what} code)")
