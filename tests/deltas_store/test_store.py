"""Tests of the on-disk delta store: round trips, content addressing, crash safety, concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deltas_store.errors import DeltaNotFoundError, DeltaStoreError, InvalidNameError, StoreCorruptedError
from deltas_store.store import DeltaStore, validate_name


def _write(path: Path, data: bytes | None = None, size: int = 4096) -> bytes:
    data = os.urandom(size) if data is None else data
    path.write_bytes(data)
    return data


def _objects(root: Path) -> list[Path]:
    return sorted((root / "objects").iterdir())


def test_put_get_list_versions_delete_round_trip(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "store")
    data = _write(tmp_path / "a.safetensors")
    put = store.put("math-v1.2_x", tmp_path / "a.safetensors", summary={"method": "dare", "drop_rate": 0.9})

    got = store.get("math-v1.2_x")
    assert got == put
    assert (got.version, got.size, got.sha256) == (1, len(data), hashlib.sha256(data).hexdigest())
    assert got.path == tmp_path / "store" / "objects" / f"{got.sha256}.safetensors"
    assert got.path.read_bytes() == data
    assert got.summary == {"method": "dare", "drop_rate": 0.9}
    assert abs(got.created - time.time()) < 60
    assert (tmp_path / "a.safetensors").read_bytes() == data  # copied, not moved
    assert "math-v1.2_x" in store
    assert store.versions("math-v1.2_x") == [got]
    assert store.list() == [got]
    # A second handle on the same root sees the same state.
    assert DeltaStore(tmp_path / "store").get("math-v1.2_x") == got

    assert store.delete("math-v1.2_x") == [got]
    assert "math-v1.2_x" not in store
    assert store.list() == []
    assert _objects(tmp_path / "store") == []
    with pytest.raises(DeltaNotFoundError):
        store.get("math-v1.2_x")


def test_list_is_latest_version_of_each_name_sorted(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    for name in ["zeta", "alpha", "mid", "alpha"]:
        _write(tmp_path / "f")
        store.put(name, tmp_path / "f")
    assert [(d.name, d.version) for d in store.list()] == [("alpha", 2), ("mid", 1), ("zeta", 1)]


def test_re_put_bumps_version_and_keeps_old_versions(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    first = _write(tmp_path / "1")
    second = _write(tmp_path / "2")
    v1 = store.put("chat", tmp_path / "1", summary={"n": 1})
    v2 = store.put("chat", tmp_path / "2", summary={"n": 2})
    assert (v1.version, v2.version) == (1, 2)
    assert store.get("chat") == v2
    assert store.get("chat", 1).path.read_bytes() == first
    assert store.get("chat", 2).path.read_bytes() == second
    assert store.get("chat", 1).summary == {"n": 1}
    assert store.versions("chat") == [v1, v2]
    assert store.list() == [v2]


def test_same_content_shares_one_object_until_last_reference_is_deleted(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = DeltaStore(root)
    data = _write(tmp_path / "f")
    a = store.put("a", tmp_path / "f")
    b = store.put("b", tmp_path / "f")
    assert a.path == b.path
    assert _objects(root) == [a.path]

    store.delete("a")
    assert _objects(root) == [b.path]
    assert store.get("b").path.read_bytes() == data
    store.verify("b")

    store.delete("b")
    assert _objects(root) == []


def test_deleting_a_name_keeps_objects_used_by_its_other_versions_elsewhere(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    _write(tmp_path / "shared")
    _write(tmp_path / "own")
    store.put("a", tmp_path / "shared")
    own = store.put("a", tmp_path / "own")
    shared = store.put("b", tmp_path / "shared")
    store.delete("a")
    assert not own.path.exists()
    assert shared.path.exists()


@pytest.mark.parametrize(
    "name", ["a/b", "..", ".", "a\\b", "", "x" * 200, "name with space", "-x", ".hidden", "a\n"]
)
def test_invalid_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid delta name"):
        validate_name(name)
    store = DeltaStore(tmp_path / "s")
    _write(tmp_path / "f")
    with pytest.raises(InvalidNameError):
        store.put(name, tmp_path / "f")
    with pytest.raises(InvalidNameError):
        store.get(name)
    assert name not in store
    assert _objects(tmp_path / "s") == []
    assert store.list() == []


@pytest.mark.parametrize("name", ["a", "A.b-c_9", "x" * 128, "v1..2", "name."])
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


def test_unknown_name_or_version_raises_not_found(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    with pytest.raises(DeltaNotFoundError, match="nope"):
        store.get("nope")
    with pytest.raises(DeltaNotFoundError):
        store.versions("nope")
    with pytest.raises(DeltaNotFoundError):
        store.delete("nope")
    _write(tmp_path / "f")
    store.put("yes", tmp_path / "f")
    with pytest.raises(DeltaNotFoundError, match="version 2"):
        store.get("yes", 2)
    with pytest.raises(DeltaNotFoundError):
        store.verify("yes", 0)


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"format": 2, "deltas": {}}',
        b'{"format": 1, "deltas": {"a": [{"version": 1}]}}',
        b'{"format": 1, "deltas": {"../etc": []}}',
        b'{"format": 1, "deltas": {"a": [{"version": 1, "sha256": "../../x", "size": 1, "created": 0}]}}',
    ],
)
def test_corrupt_index_raises_store_error(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "s"
    store = DeltaStore(root)
    (root / "index.json").write_bytes(content)
    with pytest.raises(StoreCorruptedError, match=r"index\.json is corrupt"):
        store.list()
    with pytest.raises(DeltaStoreError):
        store.get("a")
    with pytest.raises(DeltaStoreError, match="corrupt"):
        DeltaStore(root)


def test_failed_index_update_leaves_old_state_and_no_orphans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "s"
    store = DeltaStore(root)
    old_data = _write(tmp_path / "old")
    old = store.put("d", tmp_path / "old")
    _write(tmp_path / "new")
    index_before = (root / "index.json").read_bytes()

    real_replace = os.replace

    def crashing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).name == "index.json":
            raise OSError("simulated crash during index update")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        store.put("d", tmp_path / "new")
    with pytest.raises(OSError, match="simulated crash"):
        store.put("other", tmp_path / "new")
    monkeypatch.undo()

    assert (root / "index.json").read_bytes() == index_before
    assert store.get("d") == old
    assert store.versions("d") == [old]
    assert "other" not in store
    assert _objects(root) == [old.path]
    assert list((root / "tmp").iterdir()) == []

    fresh = DeltaStore(root)
    assert fresh.list() == [old]
    assert fresh.verify("d").path.read_bytes() == old_data
    assert fresh.put("d", tmp_path / "new").version == 2


def test_open_cleans_up_after_a_hard_crash(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = DeltaStore(root)
    _write(tmp_path / "kept")
    kept = store.put("kept", tmp_path / "kept")
    # What a writer killed mid-put leaves: a half-written temp file and an object the index never named.
    stale = root / "tmp" / "put-crashed.part"
    _write(stale, size=100)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    in_progress = root / "tmp" / "upload-other-process.part"
    _write(in_progress, size=100)
    orphan = root / "objects" / f"{'ab' * 32}.safetensors"
    _write(orphan, size=100)
    unrelated = root / "objects" / "README"
    unrelated.write_text("not an object")

    fresh = DeltaStore(root)
    assert not stale.exists()
    assert in_progress.exists()  # young: may belong to a concurrent writer
    assert not orphan.exists()
    assert unrelated.exists()
    assert fresh.list() == [kept]
    fresh.verify("kept")


def test_verify_detects_a_flipped_byte_and_get_detects_missing_or_truncated_files(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    _write(tmp_path / "f")
    delta = store.put("d", tmp_path / "f")
    assert store.verify("d") == delta

    raw = bytearray(delta.path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    delta.path.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptedError, match="corrupted"):
        store.verify("d")

    delta.path.write_bytes(bytes(raw[:-1]))
    with pytest.raises(StoreCorruptedError, match="bytes"):
        store.get("d")

    delta.path.unlink()
    with pytest.raises(StoreCorruptedError, match="missing"):
        store.get("d")
    with pytest.raises(StoreCorruptedError):
        store.verify("d", 1)


def test_re_putting_equal_content_heals_a_corrupted_object(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    data = _write(tmp_path / "f")
    delta = store.put("d", tmp_path / "f")
    delta.path.write_bytes(b"rot" + data[3:])
    store.put("e", tmp_path / "f")
    assert store.verify("d").path.read_bytes() == data


def test_staging_file_then_put_move(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = DeltaStore(root)
    with store.staging_file() as staged:
        assert staged.parent == root / "tmp"
        assert staged.exists()
        data = _write(staged)
        delta = store.put("up", staged, summary={"method": "darex"}, move=True)
        assert not staged.exists()
    assert store.get("up").path.read_bytes() == data
    assert delta.path.stat().st_mode & 0o777 == 0o644
    assert list((root / "tmp").iterdir()) == []


def test_staging_file_is_removed_on_exit_and_on_error(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    with store.staging_file() as a, store.staging_file() as b:
        assert a != b
        _write(a)
    assert not a.exists() and not b.exists()
    with pytest.raises(RuntimeError), store.staging_file() as c:
        _write(c)
        raise RuntimeError("upload aborted")
    assert not c.exists()
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_put_move_from_outside_the_store_consumes_the_source(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    data = _write(tmp_path / "f")
    delta = store.put("m", tmp_path / "f", move=True)
    assert not (tmp_path / "f").exists()
    assert delta.path.read_bytes() == data


def test_put_move_of_a_symlink_or_hard_link_stores_a_private_regular_file(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    data = _write(tmp_path / "target")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "hard").hardlink_to(tmp_path / "target")
    via_symlink = store.put("sym", tmp_path / "link", move=True)
    via_hardlink = store.put("hard", tmp_path / "hard", move=True)
    assert not (tmp_path / "link").exists() and not (tmp_path / "hard").exists()
    assert via_symlink.path == via_hardlink.path
    assert not via_symlink.path.is_symlink()
    assert via_symlink.path.stat().st_nlink == 1
    (tmp_path / "target").write_bytes(b"changed later")
    assert store.verify("sym").path.read_bytes() == data


def test_put_rejects_bad_source_and_bad_summary_without_storing(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path / "s")
    with pytest.raises(DeltaStoreError, match="not a regular file"):
        store.put("d", tmp_path / "missing")
    with pytest.raises(DeltaStoreError, match="not a regular file"):
        store.put("d", tmp_path)
    _write(tmp_path / "f")
    with pytest.raises(DeltaStoreError, match="JSON"):
        store.put("d", tmp_path / "f", summary={"x": object()})
    with pytest.raises(DeltaStoreError, match="JSON"):
        store.put("d", tmp_path / "f", summary={"x": float("nan")})
    with pytest.raises(DeltaStoreError, match="bytes"):
        store.put("d", tmp_path / "f", summary={"x": "y" * 100_000})
    assert store.list() == []
    assert _objects(tmp_path / "s") == []
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_index_file_is_plain_json_with_the_recorded_fields(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = DeltaStore(root)
    _write(tmp_path / "f")
    d = store.put("d", tmp_path / "f", summary={"drop_rate": 0.5})
    index = json.loads((root / "index.json").read_text())
    assert index == {
        "format": 1,
        "deltas": {
            "d": [
                {
                    "version": 1,
                    "sha256": d.sha256,
                    "size": d.size,
                    "created": d.created,
                    "summary": {"drop_rate": 0.5},
                }
            ]
        },
    }


def test_concurrent_thread_puts_all_land_and_readers_never_see_a_partial_index(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = DeltaStore(root)
    other = DeltaStore(root)  # a second handle on the same root: ordered only by the file lock
    n_threads, n_puts = 8, 6
    stop = threading.Event()

    def writer(i: int) -> None:
        handle = store if i % 2 else other
        for j in range(n_puts):
            src = tmp_path / f"src-{i}-{j}"
            _write(src, size=512)
            handle.put("shared", src, summary={"writer": i, "j": j})
            handle.put(f"own-{i}", src)

    def reader() -> int:
        reads = 0
        while not stop.is_set():
            other.list()
            if "shared" in store:
                store.get("shared")
            reads += 1
        return reads

    with ThreadPoolExecutor(max_workers=n_threads + 2) as pool:
        readers = [pool.submit(reader) for _ in range(2)]
        writers = [pool.submit(writer, i) for i in range(n_threads)]
        try:
            for w in writers:
                w.result()  # re-raises a writer's exception
        finally:
            stop.set()
        assert all(r.result() > 0 for r in readers)

    shared = DeltaStore(root).versions("shared")
    assert [d.version for d in shared] == list(range(1, n_threads * n_puts + 1))
    assert sorted((d.summary["writer"], d.summary["j"]) for d in shared) == [
        (i, j) for i in range(n_threads) for j in range(n_puts)
    ]
    for i in range(n_threads):
        assert [d.version for d in store.versions(f"own-{i}")] == list(range(1, n_puts + 1))
    for d in shared:
        store.verify("shared", d.version)


def _process_writer(root: str, src_dir: str, worker: int, n_puts: int) -> None:
    store = DeltaStore(Path(root))
    for j in range(n_puts):
        src = Path(src_dir) / f"p{worker}-{j}"
        src.write_bytes(os.urandom(256) + bytes([worker, j]))
        store.put("shared", src, summary={"worker": worker, "j": j})


def test_concurrent_process_puts_all_land(tmp_path: Path) -> None:
    root = tmp_path / "s"
    DeltaStore(root)
    n_puts = 15
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_process_writer, args=(str(root), str(tmp_path), w, n_puts)) for w in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]

    store = DeltaStore(root)
    shared = store.versions("shared")
    assert [d.version for d in shared] == list(range(1, 2 * n_puts + 1))
    assert sorted((d.summary["worker"], d.summary["j"]) for d in shared) == [
        (w, j) for w in range(2) for j in range(n_puts)
    ]
    assert len(_objects(root)) == 2 * n_puts


def test_the_index_is_parsed_once_per_change_and_other_writers_are_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltas_store import store as store_module

    reader, writer = DeltaStore(tmp_path / "s"), DeltaStore(tmp_path / "s")  # two handles, like two processes
    for name, data in (("a.bin", b"first"), ("a2.bin", b"other"), ("b.bin", b"bee")):
        _write(tmp_path / name, data)
    writer.put("a", tmp_path / "a.bin")
    parses = 0
    parse = store_module._Index.model_validate_json

    def counting(raw: bytes) -> store_module._Index:
        nonlocal parses
        parses += 1
        return parse(raw)

    monkeypatch.setattr(store_module._Index, "model_validate_json", counting)
    assert reader.get("a").version == 1
    assert reader.get("a").version == 1 and "a" in reader and parses == 1  # unchanged: parsed once
    writer.put("a", tmp_path / "a2.bin")
    writer.put("b", tmp_path / "b.bin")
    assert reader.get("a").version == 2 and [d.name for d in reader.list()] == ["a", "b"]
    writer.delete("b")
    assert [d.name for d in reader.list()] == ["a"]
