"""The allocator setting a training process makes: freed activations are reused, not page-faulted in again."""

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
