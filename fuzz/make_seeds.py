#!/usr/bin/env python3
"""Writes the seed corpus of the ring fuzz targets: well-formed rings in the layout that
fuzz_targets/common.rs expects (byte 0: queue size exponent, byte 1: knobs, then guest memory with
descriptors at 0, split available ring at 0x1000 and used ring at 0x2000, packed driver and device
areas at 0x1000 and 0x1004)."""
import os
import struct

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
MEM = 0x2C00  # only the first pages need content; the rest of guest memory stays zero


def desc(addr, length, a, b):
    return struct.pack("<QIHH", addr, length, a, b)


def put(mem, off, data):
    mem[off:off + len(data)] = data


def split_seed(knobs, indirect, swapped=False):
    mem = bytearray(MEM)
    # chain 0: readable 0x2400+64, writable 0x2500+64 (heads 0 -> 1); swapped, the writable one
    # first (a chain both paths must refuse)
    first, second = (NEXT | WRITE, 0) if swapped else (NEXT, WRITE)
    put(mem, 0, desc(0x2400, 64, first, 1))
    put(mem, 16, desc(0x2500, 64, second, 0))
    # chain 2: either direct one writable buffer that straddles nothing, or an indirect table
    if indirect:
        put(mem, 32, desc(0x2800, 32, INDIRECT, 0))
        put(mem, 0x2800, desc(0x2600, 16, NEXT, 1))
        put(mem, 0x2810, desc(0x2700, 16, WRITE, 0))
    else:
        put(mem, 32, desc(0x2600, 128, WRITE, 0))
    put(mem, 0x1000, struct.pack("<HHHH", 0, 2, 0, 2))  # flags, idx, ring[0], ring[1]
    return bytes([3, knobs]) + bytes(mem)


def packed_seed(knobs, indirect, swapped=False):
    mem = bytearray(MEM)
    first, second = (NEXT | WRITE, 0) if swapped else (NEXT, WRITE)
    put(mem, 0, desc(0x2400, 64, 7, AVAIL | first))
    put(mem, 16, desc(0x2500, 64, 7, AVAIL | second))
    if indirect:
        put(mem, 32, desc(0x2800, 32, 9, AVAIL | INDIRECT))
        put(mem, 0x2800, desc(0x2600, 16, 0, 0))
        put(mem, 0x2810, desc(0x2700, 16, 0, WRITE))
    else:
        put(mem, 32, desc(0x2600, 128, 9, AVAIL | WRITE))
    return bytes([3, knobs]) + bytes(mem)


here = os.path.dirname(os.path.abspath(__file__))
for target, make in (("split_chain", split_seed), ("packed_chain", packed_seed)):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    # knobs: plain pop, translating, EVENT_IDX, reverse completion, pop_each deferring, pop_each
    # completing every other chain at once (see fuzz_targets/common.rs)
    for knobs in (0, 1, 2, 6, 16, 50):
        for indirect in (False, True):
            with open(os.path.join(d, f"seed-k{knobs}-{'ind' if indirect else 'dir'}"), "wb") as f:
                f.write(make(knobs, indirect))
        with open(os.path.join(d, f"seed-k{knobs}-swapped"), "wb") as f:
            f.write(make(knobs, False, True))
