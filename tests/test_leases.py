"""Leases and cleanup: sessions expire after an idle TTL (refreshed by use) from the session
table, the node store and the directory; a session deleted during a turn goes when the turn
ends; a store's arena file is removed when its process dies, however it dies."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from actors.directory import SessionDirectoryCore
from actors.kv_store import KVStoreCore, arena_path
from actors.session_table import SessionTable
from engine.config import ModelConfig
from engine.errors import SessionEvicted
from engine.host_arena import ArenaLayout

TINY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, eos_token_ids=(2,))
LAYOUT = ArenaLayout.of(TINY, 8, torch.float32)


def test_idle_sessions_expire_and_use_refreshes_them():
    table = SessionTable(20, 1)
    for session_id in ("old", "used", "busy"):
        table.put("w", session_id, list(range(16)), table.lease("w", 2))
    t0 = time.monotonic()
    table.pin("used")
    table.unpin("used")  # a turn: refreshes it
    table.pin("busy")  # a turn still runs: never expires
    table.records["old"].last_used = table.records["busy"].last_used = t0 - 100
    assert table.expire(50, now=t0 + 1) == ["old"]
    assert set(table.records) == {"used", "busy"} and table.num_free == 16 and table.num_expired == 1
    with pytest.raises(SessionEvicted, match="expired"):
        table.get("old")
    assert table.expire(50, now=t0 + 200) == ["used"]


def test_a_session_deleted_during_a_turn_goes_when_the_turn_ends():
    table = SessionTable(10, 1)
    table.put("w", "s", list(range(16)), table.lease("w", 2))
    table.pin("s")
    assert table.delete("s") and table.num_free == 8  # its blocks are still read
    assert table.unpin("s") and table.num_free == 10


def test_the_store_and_the_directory_expire_idle_sessions(tmp_path):
    store = KVStoreCore("n", LAYOUT, 20 * LAYOUT.block_bytes, arena_path("ttl", "n", str(tmp_path)))
    store.put("w", "s", list(range(16)), store.lease("w", 2))
    assert store.expire(60) == [] and store.has("s")
    time.sleep(0.1)
    assert store.expire(0.05) == ["s"] and not store.has("s") and store.stats().expired == 1
    directory = SessionDirectoryCore()
    for session_id in ("s", "t"):
        directory.create(session_id, [5, 6], "replica", "n")
    directory.entries["s"].last_used -= 10
    assert directory.expire(5) == ["s"] and list(directory.entries) == ["t"]
    store.close()
    assert not os.path.exists(store.path)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_an_arena_file_goes_with_its_process_however_it_dies(tmp_path, how):
    path = tmp_path / "lsa-kv-test.arena"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from actors.kv_store_actor import unlink_when_dead\n"
        f"open({str(path)!r}, 'wb').write(b'kv')\n"
        f"watcher = unlink_when_dead({str(path)!r})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert child.stdout.readline().strip() == b"ready" and path.exists()
    child.send_signal(how)
    child.wait(timeout=10)
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not path.exists()
