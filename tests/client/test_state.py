"""Tests of the local state file: records, atomic writes, locking across processes, recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from ephemwork.client import state
from ephemwork.client.state import (
    SessionRecord,
    StateStore,
    default_home,
    is_process_alive,
    process_start_ticks,
)
from ephemwork.errors import StateError


def _record(service: str = "api", pid: int | None = None, **changes: object) -> SessionRecord:
    fields: dict[str, object] = {
        "user": "alice",
        "service": service,
        "local_port": 8000,
        "bastion_port": 20001,
        "session_id": f"session-{service}",
        "pid": os.getpid() if pid is None else pid,
        "pid_start_ticks": process_start_ticks(os.getpid() if pid is None else pid),
        "started_at": 1700000000.0,
        "tunnel": "ssh alice@127.0.0.1:2222",
        "state": "serving",
    }
    fields.update(changes)
    return SessionRecord(**fields)  # type: ignore[arg-type]


def _dead_pid() -> int:
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(process.stdout)


class TestStateStore:
    def test_add_and_list(self, tmp_path: Path) -> None:
        """An added record is listed and survives a new store on the same folder."""
        StateStore(tmp_path).add(_record())

        records = StateStore(tmp_path).list_records()

        assert records == [_record()]

    def test_home_mode(self, tmp_path: Path) -> None:
        """The home folder is created with mode 0700."""
        home = tmp_path / "home"

        StateStore(home).add(_record())

        assert (home.stat().st_mode & 0o777) == 0o700

    def test_home_from_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """EPHEMWORK_HOME overrides the default folder."""
        monkeypatch.setenv("EPHEMWORK_HOME", str(tmp_path))

        assert default_home() == tmp_path

    def test_update(self, tmp_path: Path) -> None:
        """update changes the named fields only."""
        store = StateStore(tmp_path)
        store.add(_record())

        store.update("alice", "api", state="stopping", bastion_port=20002)

        assert store.get("alice", "api") == _record(state="stopping", bastion_port=20002)

    def test_update_missing(self, tmp_path: Path) -> None:
        """Updating a route with no record raises StateError naming the route."""
        with pytest.raises(StateError, match="alice:web"):
            StateStore(tmp_path).update("alice", "web", state="serving")

    def test_remove(self, tmp_path: Path) -> None:
        """remove returns the deleted record and leaves the others."""
        store = StateStore(tmp_path)
        store.add(_record("api"))
        store.add(_record("web"))

        removed = store.remove("alice", "api")

        assert removed == _record("api")
        assert store.list_records() == [_record("web")]

    def test_add_rejects_live_owner(self, tmp_path: Path) -> None:
        """A route held by another live process cannot be recorded again."""
        store = StateStore(tmp_path)
        store.add(_record(pid=os.getppid()))

        with pytest.raises(StateError, match=f"pid {os.getppid()}"):
            store.add(_record())

    def test_add_replaces_stale(self, tmp_path: Path) -> None:
        """A record whose process is gone is replaced."""
        store = StateStore(tmp_path)
        store.add(_record(pid=_dead_pid(), session_id="old"))

        store.add(_record())

        assert store.list_records() == [_record()]

    def test_remove_stale(self, tmp_path: Path) -> None:
        """remove_stale deletes only records whose process is gone."""
        store = StateStore(tmp_path)
        store.add(_record("api", pid=_dead_pid()))
        store.add(_record("web"))

        stale = store.remove_stale()

        assert [record.service for record in stale] == ["api"]
        assert store.list_records() == [_record("web")]


class TestAtomicWrite:
    def test_leaves_no_temporary_file(self, tmp_path: Path) -> None:
        """After a write the folder holds only the state file and the lock."""
        StateStore(tmp_path).add(_record())

        assert sorted(path.name for path in tmp_path.iterdir()) == ["state.json", "state.lock"]

    def test_file_is_complete_json(self, tmp_path: Path) -> None:
        """The state file is a complete JSON document with a version."""
        StateStore(tmp_path).add(_record())

        document = json.loads((tmp_path / "state.json").read_text())

        assert document["version"] == 1
        assert document["sessions"][0]["session_id"] == "session-api"

    def test_replaces_inode(self, tmp_path: Path) -> None:
        """A write replaces the file instead of rewriting it in place."""
        store = StateStore(tmp_path)
        store.add(_record("api"))
        before = (tmp_path / "state.json").stat().st_ino

        store.add(_record("web"))

        assert (tmp_path / "state.json").stat().st_ino != before

    def test_failed_transaction_writes_nothing(self, tmp_path: Path) -> None:
        """An exception inside a transaction leaves the file as it was."""
        store = StateStore(tmp_path)
        store.add(_record("api"))

        with pytest.raises(RuntimeError), store.transaction() as records:
            records.clear()
            raise RuntimeError("abort")

        assert store.list_records() == [_record("api")]


class TestConcurrency:
    def test_writers_in_processes(self, tmp_path: Path) -> None:
        """Writers in several processes lose no record and leave valid JSON."""
        script = textwrap.dedent(
            """
            import sys, os
            from pathlib import Path
            from ephemwork.client.state import SessionRecord, StateStore

            store = StateStore(Path(sys.argv[1]))
            worker = sys.argv[2]
            for index in range(20):
                store.add(SessionRecord(
                    user="alice", service=f"svc-{worker}-{index}", local_port=8000,
                    bastion_port=20000, session_id=f"{worker}-{index}", pid=os.getpid(),
                    pid_start_ticks=None, started_at=0.0, tunnel="t", state="serving",
                ))
            """
        )
        workers = [
            subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(worker)])
            for worker in range(6)
        ]
        exit_codes = [worker.wait(timeout=30) for worker in workers]

        records = StateStore(tmp_path).list_records()

        assert exit_codes == [0] * 6
        assert len({record.session_id for record in records}) == 6 * 20

    def test_lock_timeout(self, tmp_path: Path) -> None:
        """A lock held by another process raises StateError after the timeout."""
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, sys, time\n"
                "f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                "print('locked', flush=True); time.sleep(30)",
                str(tmp_path / "state.lock"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            holder.stdout.readline()

            with pytest.raises(StateError, match=r"state\.lock"):
                StateStore(tmp_path, lock_timeout=0.2).list_records()
        finally:
            holder.kill()
            holder.communicate()


class TestCorruptFile:
    def test_truncated_moved_aside(self, tmp_path: Path) -> None:
        """A truncated file is moved aside with a warning naming the new path."""
        StateStore(tmp_path).add(_record())
        state_file = tmp_path / "state.json"
        state_file.write_text(state_file.read_text()[:40])

        with structlog.testing.capture_logs() as logs:
            records = StateStore(tmp_path).list_records()

        moved = [path for path in tmp_path.iterdir() if path.name.startswith("state.json.corrupt-")]
        assert records == []
        assert len(moved) == 1
        assert logs[0]["event"] == "state.corrupt_moved_aside"
        assert logs[0]["moved_to"] == str(moved[0])

    def test_wrong_shape_moved_aside(self, tmp_path: Path) -> None:
        """Valid JSON of the wrong shape is moved aside, and later writes work."""
        (tmp_path / "state.json").write_text('{"sessions": "nope"}')
        store = StateStore(tmp_path)

        store.add(_record())

        assert store.list_records() == [_record()]


class TestProcessIdentity:
    def test_self_alive(self) -> None:
        """This process, with its own start time, is alive."""
        assert is_process_alive(os.getpid(), process_start_ticks(os.getpid()))

    def test_dead_pid(self) -> None:
        """A pid whose process has exited is not alive."""
        assert not is_process_alive(_dead_pid(), None)

    def test_unknown_start_not_ours(self) -> None:
        """A live pid without a recorded start time is not provably the recorded process."""
        assert not is_process_alive(os.getpid(), None)

    def test_without_proc(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without /proc, as on macOS, the start time comes from ps and still tells pids apart."""
        monkeypatch.setattr(state, "PROC_ROOT", tmp_path / "no-proc")
        ticks = process_start_ticks(os.getpid())
        assert ticks is not None

        assert is_process_alive(os.getpid(), ticks)
        assert not is_process_alive(os.getpid(), ticks + 1)

    @pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
    def test_reused_pid(self) -> None:
        """A live pid with another start time is not the recorded process."""
        ticks = process_start_ticks(os.getpid())
        assert ticks is not None

        assert not is_process_alive(os.getpid(), ticks + 1)
