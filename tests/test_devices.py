"""The allocator setting a training process makes: freed activations are reused, not page-faulted in again; and
the heap paged in ahead of the loop on a thread of its own."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from tuneforge.devices import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
size = 64 << 20
for _ in range(2):  # allocate, touch every page, free: as a training pass does with its activations
    block = bytearray(size)
    del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(size)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, count = out.split()
    return applied, int(count)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = (64 << 20) // 4096
    applied, plain = faults("plain")
    assert plain > pages // 2  # glibc maps a 64 MiB block afresh: every page faults in again
    applied, retained = faults("retain")
    assert applied == "True"
    assert retained < pages // 20  # the freed block is handed out again, its pages already there


WARM_PROBE = """
import resource, sys, time
import torch
from tuneforge.devices import HeapWarmer, retain_freed_memory
assert retain_freed_memory()
size = 96 << 20
if sys.argv[1] == "warm":
    warmer = HeapWarmer(128 << 20)
    deadline = time.time() + 60
    while warmer.touched < 128 << 20 and time.time() < deadline:  # (a loop would call finish whenever it starts)
        time.sleep(0.01)
    print(warmer.finish(), warmer.finish())
else:
    print(0, 0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.empty(size, dtype=torch.uint8)
block.fill_(1)  # a training pass writing its activations
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def warm_faults(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", WARM_PROBE, mode], capture_output=True, text=True,
                         check=True).stdout
    first, second, count = out.split()
    return int(first), int(second), int(count)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_warmed_heap_is_written_by_the_loop_without_faulting_it_in():
    pages = (96 << 20) // 4096
    _, _, cold = warm_faults("cold")
    assert cold > pages // 2  # a fresh 96 MiB tensor: its pages fault in as it is written
    touched, again, warmed = warm_faults("warm")
    assert touched == again == 128 << 20  # finish: the bytes paged in, and idempotent
    assert warmed < pages // 20  # the freed block is handed out again, its pages already there
