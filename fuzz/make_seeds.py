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


def net_seed(port, knobs):
    """net_chains (fuzz_targets/net_chains.rs): byte 0 port, byte 1 acked-feature knobs, byte 2
    queue size exponent, then guest memory: receive ring at 0/0x1000/0x1800, transmit ring at
    0x2000/0x3000/0x3800, buffers from 0x4000."""
    mem = bytearray(0xA000)

    def hdr(flags=0, gso=0, gso_size=0, start=0, off=0):
        return struct.pack("<BBHHHHH", flags, gso, 54, gso_size, start, off, 0)

    frame = bytes([0xFF] * 6 + [2, 0, 0, 0, 0, 1] + [8, 0]) + bytes(range(46))
    tx = 0x2000
    # 0: header and frame in one buffer; 1: header, then frame; 2: a TCPv4 GSO super-frame
    # with a partial checksum; 3: an indirect table of header and frame.
    put(mem, 0x4000, hdr() + frame)
    put(mem, tx + 0, desc(0x4000, 12 + len(frame), 0, 0))
    put(mem, 0x4100, hdr())
    put(mem, 0x4200, frame)
    put(mem, tx + 16, desc(0x4100, 12, NEXT, 2))
    put(mem, tx + 32, desc(0x4200, len(frame), 0, 0))
    put(mem, 0x5000, hdr(1, 1, 1448, 34, 16) + frame + bytes(3000))
    put(mem, tx + 48, desc(0x5000, 12 + len(frame) + 3000, 0, 0))
    put(mem, 0x4800, desc(0x4100, 12, NEXT, 1) + desc(0x4200, len(frame), 0, 0))
    put(mem, tx + 64, desc(0x4800, 32, INDIRECT, 0))
    put(mem, 0x3000, struct.pack("<HHHHHH", 0, 4, 0, 1, 3, 4))
    # Receive: two plain buffers, a header-then-data chain, an indirect one.
    put(mem, 0x0000, desc(0x6000, 2048, WRITE, 0))
    put(mem, 0x0010, desc(0x6800, 2048, WRITE, 0))
    put(mem, 0x0020, desc(0x7000, 12, NEXT | WRITE, 3))
    put(mem, 0x0030, desc(0x7100, 1500, WRITE, 0))
    put(mem, 0x4900, desc(0x7800, 1024, WRITE, 0))
    put(mem, 0x0040, desc(0x4900, 16, INDIRECT, 0))
    put(mem, 0x1000, struct.pack("<HHHHHH", 0, 4, 0, 1, 2, 4))
    return bytes([port, knobs, 3]) + bytes(mem)


d = os.path.join(here, "corpus", "net_chains")
os.makedirs(d, exist_ok=True)
# ports: sink, loopback, source; knobs: see net_chains.rs (1 MRG_RXBUF, 2 checksums, 4
# segmentation, 8 EVENT_IDX, 16 indirect, 32 no VERSION_1)
for port in (0, 1, 2):
    for knobs in (0, 1, 3, 7, 15, 31, 17, 33):
        with open(os.path.join(d, f"seed-p{port}-k{knobs}"), "wb") as f:
            f.write(net_seed(port, knobs))
