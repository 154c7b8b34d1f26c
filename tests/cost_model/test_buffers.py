"""XLA-style buffer placement (cost_model/buffers.py) on hand-placed cases."""

from autoshard.cost_model.buffers import assigned_bytes, heap_bytes


def live_peak(buffers):
    return max(sum(b for b, s, e in buffers if s <= t < e) for t in range(10))


def test_a_heap_leaves_a_hole_where_buffers_keep_their_offsets():
    # (bytes, start, end). Live bytes never exceed 3, but once the two 2-byte buffers sit at
    # offset 0 and the 1-byte one that spans both at offset 2, the last 1-byte one overlaps
    # all three: offset 3 (by size). By lifetime the 1-byte ones take offsets 0 and 1 and the
    # 2-byte ones cannot both fit below 3 either. Both orders need 4.
    buffers = [(2, 4, 6), (2, 0, 2), (1, 3, 6), (1, 0, 4)]
    assert live_peak(buffers) == 3
    assert heap_bytes(buffers) == 4


def test_disjoint_lifetimes_share_offsets():
    assert heap_bytes([(4, 0, 2), (4, 2, 4), (3, 1, 2)]) == 7
    assert heap_bytes([]) == 0


def test_temporaries_use_result_allocations_until_the_results_are_written():
    results = [(4, 5), (1, 2)]                      # (bytes, position written)
    temporaries = [(3, 0, 5),    # into the 4-byte result's allocation: free until 5
                   (1, 0, 2),    # into the 1-byte one (the smallest that holds it)
                   (2, 3, 6),    # the 4-byte allocation is taken from 3 to 5: heap
                   (5, 0, 1)]    # larger than every result: heap, disjoint from the 2
    assert assigned_bytes(10, results, temporaries) == 10 + 5 + 5
