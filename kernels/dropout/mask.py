"""The packed keep mask: bit ``e % 8`` of byte ``e // 8`` is ``keep(offset + e)``."""

from numba import cuda, int64, uint8, uint32, uint64

from .philox import THREE, TWO, philox_block, select_word

GROUP = 4  # elements per Philox block
MASK_BITS = 8  # elements per output byte

_MASK_SIG = "void(uint8[::1], int64, uint32, uint32, uint64, uint64)"


def dropout_mask_source():
    """Keep mask packed 1 bit per element: bit ``e % 8`` of byte ``e // 8`` is ``keep(offset + e)``.

    The layout of ``numpy.packbits(keep, bitorder="little")``; padding bits past ``n`` are 0.
    One thread per byte: its 8 elements span 2 Philox blocks (3 when ``offset % 4 != 0``).
    """

    def dropout_mask(mask, n, k0, k1, offset, threshold):
        # mask is (ceil(n / 8),) uint8; n elements, n >= 0
        start = int64(cuda.grid(1))
        stride = int64(cuda.gridsize(1))
        # byte b's bit 0 is the absolute index offset + 8 b: block offset // 4 + 2 b, lane offset % 4
        # (computed this way, offset + 8 b never wraps past 2**64)
        head = int64(offset & THREE)
        for b in range(start, mask.size, stride):
            block = (offset >> TWO) + uint64(2 * b)
            bits = uint32(0)
            for k in range(3):
                if k < 2 or head > 0:
                    r0, r1, r2, r3 = philox_block(block + uint64(k), k0, k1)
                    for lane in range(GROUP):
                        i = GROUP * k + lane - head  # the bit this word decides
                        in_byte = i >= 0 and i < MASK_BITS and MASK_BITS * b + i < n
                        if in_byte and uint64(select_word(r0, r1, r2, r3, uint64(lane))) >= threshold:
                            bits |= uint32(1) << uint32(i)
            mask[b] = uint8(bits)

    return dropout_mask
