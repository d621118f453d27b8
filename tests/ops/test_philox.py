import pytest
import torch
from hypothesis import given, settings, strategies as st

from fimoda_kernels import philox4x32
from fimoda_kernels.ops.philox import _philox4x32_reference

# Random123's known-answer vectors for Philox4x32-10 (MATH.md §9): counter, key -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _single_philox(c, k):
    """Philox4x32-10 on Python ints, straight from the round definition (an independent oracle)."""
    m = 0xFFFFFFFF
    c0, c1, c2, c3 = c
    k0, k1 = k
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & m, (p0 >> 32) ^ c3 ^ k1, p0 & m
    return c0, c1, c2, c3


def test_known_answers_reference():
    for c, k, want in KNOWN_ANSWERS:
        assert _single_philox(c, k) == want
        got = _philox4x32_reference(torch.tensor(c), torch.tensor(k))
        assert tuple(got.tolist()) == want


def test_known_answers(backend_device):
    backend, device = backend_device
    counter = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], device=device)
    key = torch.tensor([k for _, k, _ in KNOWN_ANSWERS], device=device)
    out = philox4x32(counter, key, backend=backend)
    assert out.tolist() == [list(w) for _, _, w in KNOWN_ANSWERS]


def test_random_counters_bit_identical(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, (1031, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2**32, (1031, 2), generator=g, dtype=torch.int64)
    want = _philox4x32_reference(counter, key)
    out = philox4x32(counter.to(device), key.to(device), backend=backend)
    assert torch.equal(out.cpu(), want)
    for i in (0, 517, 1030):
        assert tuple(want[i].tolist()) == _single_philox(counter[i].tolist(), key[i].tolist())


def test_broadcast_key(backend_device):
    backend, device = backend_device
    counter = torch.randint(0, 2**32, (3, 5, 4), dtype=torch.int64, device=device)
    key = torch.tensor([123, 2**32 - 7], device=device)
    out = philox4x32(counter, key, backend=backend)
    assert out.shape == (3, 5, 4)
    assert torch.equal(out.cpu(), _philox4x32_reference(counter.cpu(), key.expand(3, 5, 2).cpu()))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6))
def test_reference_matches_scalar_oracle(words):
    counter, key = torch.tensor(words[:4]), torch.tensor(words[4:])
    assert tuple(_philox4x32_reference(counter, key).tolist()) == _single_philox(words[:4], words[4:])


@pytest.mark.parametrize("counter,key,match", [
    (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64), "counter: expected dtype"),
    (torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), r"counter: expected shape \[\.\.\., 4\]"),
    (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 3, dtype=torch.int64), r"key: expected shape \[\.\.\., 2\]"),
    (torch.full((3, 4), 2**32, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), "counter: expected uint32"),
    (torch.zeros(3, 4, dtype=torch.int64), torch.full((3, 2), -1, dtype=torch.int64), "key: expected uint32"),
    (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), "do not broadcast"),
    ([0, 0, 0, 0], torch.zeros(2, dtype=torch.int64), "counter: expected a torch.Tensor"),
])
def test_bad_input(counter, key, match):
    with pytest.raises((TypeError, ValueError), match=match):
        philox4x32(counter, key)
