"""bmojo.allocator: glibc keeps freed large blocks once applied; a user's allocator is left alone."""

import json
import os
import platform
import subprocess
import sys

import pytest

from bmojo import allocator

# Bytes glibc serves by mmap (mallinfo2's hblkhd) while a 64 MiB tensor is alive, before and after
# keep_freed_memory(), in a fresh interpreter (mallopt changes the whole process).
MMAPPED_BYTES_SCRIPT = """
import ctypes, json, torch
from bmojo.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mmapped_while_held():
    held = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    return libc.mallinfo2().hblkhd

before = mmapped_while_held()
status = keep_freed_memory()
after = mmapped_while_held()
print(json.dumps({"before": before, "after": after, "status": status}))
"""


def _glibc_version() -> tuple[int, ...]:
    libc, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if libc == "glibc" else ()


@pytest.mark.skipif(_glibc_version() < (2, 33), reason="needs glibc's mallopt and mallinfo2 (glibc >= 2.33)")
def test_large_tensors_come_from_the_heap_once_applied():
    env = {name: value for name, value in os.environ.items()  # no allocator choice of the caller's
           if not name.startswith("MALLOC_") and name not in ("LD_PRELOAD", allocator.OPT_OUT_VARIABLE)}
    done = subprocess.run([sys.executable, "-c", MMAPPED_BYTES_SCRIPT], capture_output=True, text=True, env=env,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] >= 64 * 2**20  # default glibc: the tensor is its own mmap
    assert result["after"] < 64 * 2**20  # kept on the heap, reused by the next step
    assert result["status"].startswith("glibc malloc keeping freed blocks")


@pytest.mark.parametrize("environ, expected", [
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "preloaded allocator (/usr/lib/libjemalloc.so.2), unchanged"),
    ({"MALLOC_ARENA_MAX": "2"}, "glibc malloc with the user's MALLOC_* settings, unchanged"),
    ({"BMOJO_ALLOCATOR": "system"}, "system allocator, unchanged (BMOJO_ALLOCATOR=system)"),
])
def test_a_users_allocator_choice_is_kept(monkeypatch, environ, expected):
    def refuse(*_):
        raise AssertionError("mallopt must not be called")

    monkeypatch.setattr(allocator.ctypes, "CDLL", refuse)
    monkeypatch.setattr(allocator, "STATUS", allocator.STATUS)
    assert allocator.keep_freed_memory(environ) == expected
    assert allocator.STATUS == expected


def test_the_cli_keeps_freed_memory_except_where_it_measures_process_memory(monkeypatch, tmp_path):
    from bmojo import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["eval", "--ckpt", str(tmp_path / "missing")]) == 2  # any command: applied first
    assert calls == [True]
    calls.clear()
    assert cli.main(["bench", "context", "--quick", "--no-progress", "--lengths", "bad"]) == 2
    assert calls == []  # bench context reads RssAnon: glibc must hand freed blocks back
