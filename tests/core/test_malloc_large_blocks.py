"""malloc.keep_freed_memory also keeps blocks above glibc's 32 MB mmap threshold (issue 15: a
100k × 512 float32 activation is 205 MB; each step faulted ~600k fresh pages in)."""

import os
import platform
import subprocess
import sys

import pytest

_BIG_ROUNDS = """
import resource, sys
kept = None
if sys.argv[1] == "1":
    from milkit.malloc import keep_freed_memory
    kept = keep_freed_memory()
def faults():  # minor page faults while a 64 MiB block is allocated (and zeroed) after the last one was freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 << 20)
    n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    del block
    return n
faults()
print(kept, faults(), faults())
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_large_blocks_are_reused_instead_of_mapped_again():
    def run(keep: str):
        out = subprocess.run([sys.executable, "-c", _BIG_ROUNDS, keep], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return out.stdout.split()

    kept, *after = run("1")
    _, *default = run("0")
    assert kept == "True"
    assert all(int(n) < 500 for n in after)  # the freed 64 MiB came back from the heap
    assert all(int(n) > 8000 for n in default)  # glibc's default: a fresh mmap, 16384 pages of 4 KiB faulted each time
