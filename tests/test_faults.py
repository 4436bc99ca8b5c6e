"""Faults against the real node process and a real Orthanc: SIGKILL at each stage, parallel
senders, a locked database, a full spool disk.

Invariants: every instance that got Success is in the spool and the database; each series version
yields each result object (SR, key images, summary image) exactly once in the PACS; the node never
crashes and recovers when the fault goes away.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from tests.faultkit import (
    HoldingProxy,
    Rig,
    assert_each_result_once,
    db_query,
    jobs,
    leftovers,
    make_rig,
    recorded_sops,
    results_in_study,
    send_files,
    sending_in_background,
    series_rows,
    spooled_sops,
    sr_in_study,
)
from tests.peers import (
    CTMD_COVID,
    CTMD_NORMAL,
    TCIA_PHILIPS,
    TCIA_SIEMENS_B40F,
    TCIA_SIEMENS_B70F,
    Orthanc,
    reidentify_copy,
    require_shared_data,
    series_files,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.slow

OUT_OF_RESOURCES = 0xA700


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    """Collects started rigs and stops their node processes at teardown."""
    started: list[Rig] = []
    yield started
    for rig in started:
        rig.node.kill()


def study_uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def assert_acknowledged_are_kept(rig: Rig, acknowledged: set[str]) -> None:
    """Right after a kill: every acknowledged instance has its file and its row."""
    missing_files = acknowledged - spooled_sops(rig.spool)
    missing_rows = acknowledged - recorded_sops(rig.db)
    assert not missing_files, f"{len(missing_files)} acknowledged instance(s) not spooled"
    assert not missing_rows, f"{len(missing_rows)} acknowledged instance(s) not recorded"


def finish_and_count_srs(rig: Rig, files: list[Path], timeout: float = 120) -> None:
    """Resend everything (as a PACS would), then: one series v1, one job done, and in Orthanc
    each result object (SR, key images, summary image) exactly once."""
    assert rig.orthanc is not None
    storescu(files, port=rig.port, aec="TRIAGE", aet="STORESCU")
    wait_for(
        lambda: [j[3] for j in jobs(rig.db)] == ["done"],
        timeout,
        interval=0.5,
        what=f"exactly one job, done (log {rig.node.log})",
    )
    rows = series_rows(rig.db)
    assert [(r[1], r[2], r[3]) for r in rows] == [("complete", len(files), 1)], rows
    assert spooled_sops(rig.spool) == recorded_sops(rig.db)
    assert len(recorded_sops(rig.db)) == len(files)
    assert_each_result_once(rig.orthanc, study_uid_of(files), rig.spool)
    assert leftovers(rig.spool) == []


def test_sigkill_during_c_store_association(
    tmp_path: Path,
    tiny_model_dir: Path,
    orthanc_factory: Callable[..., Orthanc],
    rigs: list[Rig],
) -> None:
    require_shared_data(TCIA_SIEMENS_B40F)
    files = series_files(TCIA_SIEMENS_B40F)
    rig = make_rig(tmp_path, tiny_model_dir, orthanc_factory)
    rigs.append(rig)
    rig.node.start()
    with sending_in_background(rig.port, files, delay_s=0.05) as sent:
        wait_for(lambda: len(sent.succeeded) >= 8, 60, interval=0.01, what="8 acknowledged")
        rig.node.kill()
    assert sent.failed, "the kill came too late: every instance was acknowledged"
    assert_acknowledged_are_kept(rig, sent.succeeded)
    assert leftovers(rig.spool) == [] or all(".tmp" in p.parts for p in leftovers(rig.spool))
    rig.node.start()
    finish_and_count_srs(rig, files)


def test_sigkill_at_series_completion(
    tmp_path: Path,
    tiny_model_dir: Path,
    orthanc_factory: Callable[..., Orthanc],
    rigs: list[Rig],
) -> None:
    """Kill the moment the series turns complete (before its job can run), then restart."""
    require_shared_data(TCIA_PHILIPS)
    files = series_files(TCIA_PHILIPS)
    rig = make_rig(tmp_path, tiny_model_dir, orthanc_factory, quiet_s=1.0)
    rigs.append(rig)
    rig.node.start()
    sent = send_files(rig.port, files)
    assert sent.succeeded == set(sent.statuses) and len(sent.statuses) == len(files)
    wait_for(
        lambda: [r[1] for r in series_rows(rig.db)] == ["complete"],
        30,
        interval=0.005,
        what="series complete",
    )
    rig.node.kill()
    before = jobs(rig.db)
    assert len(before) == 1 and before[0][3] in ("queued", "running"), before
    assert_acknowledged_are_kept(rig, sent.succeeded)
    rig.node.start()
    wait_for(lambda: [j[3] for j in jobs(rig.db)] == ["done"], 120, interval=0.5, what="job done")
    assert rig.orthanc is not None
    assert_each_result_once(rig.orthanc, study_uid_of(files), rig.spool)
    assert [(r[1], r[2], r[3]) for r in series_rows(rig.db)] == [("complete", len(files), 1)]


def test_sigkill_during_inference(
    tmp_path: Path,
    tiny_model_dir: Path,
    orthanc_factory: Callable[..., Orthanc],
    rigs: list[Rig],
) -> None:
    require_shared_data(CTMD_COVID)
    files = series_files(CTMD_COVID)  # 74 JPEG Lossless slices: analysis takes a while
    rig = make_rig(tmp_path, tiny_model_dir, orthanc_factory, quiet_s=1.0)
    rigs.append(rig)
    rig.node.start()
    storescu(files, port=rig.port, aec="TRIAGE", aet="STORESCU")

    def analysing() -> bool:
        return any(j[3] == "running" and j[4] == "analyse" for j in jobs(rig.db))

    wait_for(analysing, 60, interval=0.005, what="the job in analysis")
    rig.node.kill()
    killed_in = jobs(rig.db)
    assert [(j[3], j[4]) for j in killed_in] == [("running", "analyse")], killed_in
    assert rig.orthanc is not None
    assert results_in_study(rig.orthanc, study_uid_of(files)) == {}
    rig.node.start()
    finish_and_count_srs(rig, files)
    assert "requeued 1 job(s) interrupted by a restart" in rig.node.log_text()


def test_sigkill_during_sr_delivery(
    tmp_path: Path,
    tiny_model_dir: Path,
    orthanc_factory: Callable[..., Orthanc],
    rigs: list[Rig],
) -> None:
    """The PACS stores the SR (the first of the set) but its answer never reaches the node;
    kill; restart re-delivers the whole set: the deterministic UIDs make the second SR a no-op,
    so the study ends with each object (SR, key images, summary image) once."""
    require_shared_data(TCIA_SIEMENS_B70F)
    files = series_files(TCIA_SIEMENS_B70F)
    port_holder = make_rig(tmp_path / "probe", tiny_model_dir, orthanc_factory)
    orthanc = port_holder.orthanc
    assert orthanc is not None
    proxy = HoldingProxy(orthanc.dicom_port)
    try:
        rig = make_rig(tmp_path, tiny_model_dir, None, pacs_port=proxy.port, quiet_s=1.0)
        # the Orthanc of the probe rig knows the node's AE only with the probe's port: fine,
        # Orthanc checks AE title and host for C-STORE, not the port.
        rig = Rig(rig.workdir, rig.node, orthanc)
        rigs.append(rig)
        proxy.hold_answers.set()
        rig.node.start()
        storescu(files, port=rig.port, aec="TRIAGE", aet="STORESCU")
        wait_for(proxy.held.is_set, 120, interval=0.05, what="the SR sent, its answer held")
        wait_for(lambda: len(sr_in_study(orthanc, study_uid_of(files))) == 1, 30, what="SR in PACS")
        rig.node.kill()
        killed_in = jobs(rig.db)
        # the first delivery runs right after analysis, with the row already at 'deliver'
        assert [j[4] for j in killed_in] == ["deliver"] and killed_in[0][3] != "done", killed_in
        # killed in the middle of the set: the SR is stored, the objects after it are not
        assert set(results_in_study(orthanc, study_uid_of(files))) == {"sr"}
        proxy.hold_answers.clear()
        rig.node.start()
        finish_and_count_srs(rig, files)
        attempts = db_query(rig.db, "SELECT attempts, delivered_at FROM jobs")
        assert attempts[0][1] is not None
    finally:
        proxy.close()


def test_four_parallel_senders_all_stored_counted_once(
    tmp_path: Path, tiny_model_dir: Path, rigs: list[Rig]
) -> None:
    """Four storescu associations at once, each a re-identified real series, plus a fifth that
    resends one of them at the same time: everything stored, every instance counted once."""
    sources = [TCIA_SIEMENS_B40F, TCIA_SIEMENS_B70F, TCIA_PHILIPS, CTMD_NORMAL]
    require_shared_data(*sources)
    copies = [
        reidentify_copy(series_files(src), tmp_path / f"copy{i}", seed=f"parallel-{i}")
        for i, src in enumerate(sources)
    ]
    rig = make_rig(tmp_path, tiny_model_dir, None, quiet_s=3.0)
    rigs.append(rig)
    rig.node.start()
    results: list[subprocess.CompletedProcess[str]] = []

    def run(files: list[Path]) -> None:
        results.append(storescu(files, port=rig.port, aec="TRIAGE", aet="STORESCU", check=False))

    threads = [threading.Thread(target=run, args=(c,)) for c in [*copies, copies[0]]]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - started
    assert [r.returncode for r in results] == [0] * 5, [r.stderr[-500:] for r in results]
    expected = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for c in copies for f in c
    }
    assert recorded_sops(rig.db) == expected
    assert spooled_sops(rig.spool) == expected
    counts = {r[0]: r[2] for r in series_rows(rig.db)}
    assert sorted(counts.values()) == sorted(len(c) for c in copies), counts
    assert all(r[3] == 1 for r in series_rows(rig.db))
    wait_for(
        lambda: sorted(j[3] for j in jobs(rig.db)) == ["done"] * 4,
        180,
        interval=0.5,
        what="four jobs done",
    )
    print(f"\n{len(expected)} instances from 5 parallel associations in {elapsed:.1f} s")


HOLD_LOCK = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN IMMEDIATE")  # the write lock: no other writer until we end
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
"""


def hold_write_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def release(holder: subprocess.Popen[str]) -> None:
    """End the lock holder (it may have ended by itself) and close its pipe."""
    if holder.poll() is None:
        holder.kill()
    holder.wait(10)
    assert holder.stdout is not None
    holder.stdout.close()


def test_database_locked_by_another_process(
    tmp_path: Path, tiny_model_dir: Path, rigs: list[Rig]
) -> None:
    require_shared_data(TCIA_PHILIPS)
    files = series_files(TCIA_PHILIPS)
    rig = make_rig(
        tmp_path,
        tiny_model_dir,
        None,
        quiet_s=1.0,
        extra={
            "storage": {
                "spool_dir": "spool",
                "database_url": "sqlite:///node.sqlite3",
                "db_busy_timeout_s": 2.0,
            }
        },
    )
    rigs.append(rig)
    rig.node.start()
    # 1. a short lock (shorter than the busy timeout): the node waits and stores
    holder = hold_write_lock(rig.db, 0.3)
    sent = send_files(rig.port, files[:3])
    holder.wait(10)
    release(holder)
    assert sent.succeeded == set(sent.statuses) and len(sent.succeeded) == 3
    # 2. a long lock: every instance is refused with Out of Resources, nothing is kept unrecorded
    holder = hold_write_lock(rig.db, 60)
    try:
        refused = send_files(rig.port, files[3:8])
        assert list(refused.statuses.values()) == [OUT_OF_RESOURCES] * 5, refused.statuses
        assert rig.node.echo(), "node stopped answering while the database was locked"
        time.sleep(1.5)  # a few scheduler ticks fail against the lock meanwhile
    finally:
        release(holder)
    assert spooled_sops(rig.spool) == recorded_sops(rig.db) == sent.succeeded
    assert leftovers(rig.spool) == []
    # 3. recovered: the sender's retry stores everything, one series, one job
    again = send_files(rig.port, files)
    assert again.succeeded == set(again.statuses)
    wait_for(lambda: [j[3] for j in jobs(rig.db)] == ["done"], 120, interval=0.5, what="job done")
    # the refusals outlasted the quiet time, so the first 3 may have completed (and been rejected
    # for too few instances) before the resend reopened the series: one job either way
    assert [(r[1], r[2]) for r in series_rows(rig.db)] == [("complete", len(files))]
    assert rig.node.proc is not None and rig.node.proc.poll() is None


@pytest.fixture
def tmpfs_at(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``tmpfs_at("spool", "3m")`` mounts a tmpfs of that size at the test node's ``spool`` (or
    any folder under its workdir; root only: skipped elsewhere with the reason, failed under
    CI=true as root); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(folder: str, size: str) -> Path:
        mnt = tmp_path / "node" / folder
        mnt.mkdir(parents=True)
        proc = subprocess.run(
            [
                shutil.which("mount") or "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={size},mode=0700",
                "tmpfs",
                str(mnt),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            reason = f"cannot mount a tmpfs here ({proc.stderr.strip()}): disk-full test needs root"
            if os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0:
                pytest.fail(reason)
            pytest.skip(reason)
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tmpfs_spool(tmpfs_at: Callable[[str, str], Path]) -> Callable[[str], Path]:
    """``tmpfs_spool("3m")``: a tmpfs of that size as the test node's spool."""
    return lambda size: tmpfs_at("spool", size)


@pytest.fixture
def small_tmpfs(tmpfs_spool: Callable[[str], Path]) -> Path:
    """A 3 MiB tmpfs as the spool: about five 512 x 512 slices fit."""
    return tmpfs_spool("3m")


def test_spool_disk_full_answers_out_of_resources_then_recovers(
    tmp_path: Path, tiny_model_dir: Path, rigs: list[Rig], small_tmpfs: Path
) -> None:
    require_shared_data(TCIA_SIEMENS_B40F)
    files = series_files(TCIA_SIEMENS_B40F)  # 30 x ~0.5 MB: about 5 fit into 3 MiB
    rig = make_rig(tmp_path, tiny_model_dir, None, quiet_s=1.0)
    rigs.append(rig)
    assert rig.spool == small_tmpfs
    rig.node.start()
    sent = send_files(rig.port, files)
    statuses = list(sent.statuses.values())
    assert 0 < len(sent.succeeded) < len(files), statuses
    assert set(statuses) == {0, OUT_OF_RESOURCES}, statuses
    # no partial files: what is in the spool is exactly what was acknowledged and recorded
    assert spooled_sops(rig.spool) == recorded_sops(rig.db) == sent.succeeded
    assert leftovers(rig.spool) == []
    for path in rig.spool.rglob("*.dcm"):
        assert len(pydicom.dcmread(path).PixelData) == 512 * 512 * 2
    # space returns: the resend stores the rest, one series, one job
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    again = send_files(rig.port, files)
    assert again.succeeded == set(again.statuses)
    wait_for(lambda: [j[3] for j in jobs(rig.db)] == ["done"], 120, interval=0.5, what="job done")
    assert [(r[1], r[2]) for r in series_rows(rig.db)] == [("complete", len(files))]
    assert "spool write failed" in rig.node.log_text()


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte with one file; returns it."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_database_disk_full_answers_out_of_resources_then_recovers(
    tmp_path: Path,
    tiny_model_dir: Path,
    rigs: list[Rig],
    tmpfs_at: Callable[[str, str], Path],
) -> None:
    """The disk holding the SQLite database fills up: the node refuses what it cannot record
    (Out of Resources), keeps no unrecorded file in the spool, keeps answering, and stores
    everything once space returns."""
    require_shared_data(TCIA_PHILIPS)
    files = series_files(TCIA_PHILIPS)
    dbfs = tmpfs_at("dbfs", "2m")
    storage = {"spool_dir": "spool", "database_url": "sqlite:///dbfs/node.sqlite3"}
    rig = make_rig(tmp_path, tiny_model_dir, None, quiet_s=1.0, extra={"storage": storage})
    rigs.append(rig)
    db = dbfs / "node.sqlite3"
    rig.node.start()
    first = send_files(rig.port, files[:3])
    assert first.succeeded == set(first.statuses) and len(first.succeeded) == 3
    filler = fill(dbfs)
    try:
        refused = send_files(rig.port, files[3:])
        statuses = list(refused.statuses.values())
        assert OUT_OF_RESOURCES in statuses and set(statuses) <= {0, OUT_OF_RESOURCES}, statuses
        assert rig.node.echo(), "node stopped answering while its database disk was full"
        time.sleep(1.5)  # scheduler ticks meet the full disk too
    finally:
        filler.unlink()
    stored = first.succeeded | refused.succeeded
    assert spooled_sops(rig.spool) == recorded_sops(db) == stored
    assert leftovers(rig.spool) == []
    again = send_files(rig.port, files)
    assert again.succeeded == set(again.statuses)
    wait_for(lambda: [j[3] for j in jobs(db)] == ["done"], 120, interval=0.5, what="job done")
    assert [(r[1], r[2]) for r in series_rows(db)] == [("complete", len(files))]
    assert rig.node.proc is not None and rig.node.proc.poll() is None
    log = rig.node.log_text()
    assert "database write failed" in log and "full" in log


def test_pacs_down_past_the_retries_dead_letter_then_manual_retry(
    tmp_path: Path,
    tiny_model_dir: Path,
    orthanc_factory: Callable[..., Orthanc],
    rigs: list[Rig],
) -> None:
    """The PACS stays down longer than all retries: the job is dead-lettered, visible in
    ``status`` with the reason; ``retry`` after the PACS is back delivers it, exactly once."""
    require_shared_data(TCIA_SIEMENS_B40F)
    files = series_files(TCIA_SIEMENS_B40F)
    rig = make_rig(tmp_path, tiny_model_dir, orthanc_factory, quiet_s=1.0)
    assert rig.orthanc is not None
    retry = {"max_attempts": 2, "initial_backoff_s": 0.5, "max_backoff_s": 1}
    import yaml

    config = yaml.safe_load(rig.node.config.read_text())
    config["results"]["retry"] = retry
    rig.node.config.write_text(yaml.safe_dump(config))
    rigs.append(rig)
    rig.orthanc.stop()
    rig.node.start()
    storescu(files, port=rig.port, aec="TRIAGE", aet="STORESCU")
    wait_for(
        lambda: [j[3] for j in jobs(rig.db)] == ["failed"], 90, interval=0.5, what="dead letter"
    )
    status = rig.node.status()
    assert status["jobs_by_state"] == {"failed": 1}
    row = status["recent_series"][0]
    assert row["job_state"] == "failed" and "deliver failed 2 times" in row["last_error"]
    # max_attempts 2 is two deliveries, each logged once with its number
    tried = [line for line in rig.node.log_text().splitlines() if "delivery to pacs failed" in line]
    assert len(tried) == 2, tried
    assert "(attempt 1 of 2, now queued)" in tried[0] and "(attempt 2 of 2, now failed)" in tried[1]
    rig.orthanc.start()
    job_id = str(jobs(rig.db)[0][0])
    rig.node.cli("retry", job_id)
    wait_for(lambda: [j[3] for j in jobs(rig.db)] == ["done"], 60, interval=0.5, what="delivered")
    assert rig.node.cli("retry", job_id, check=False).returncode != 0  # only failed jobs retry
    assert_each_result_once(rig.orthanc, study_uid_of(files), rig.spool)


def test_spool_full_when_the_sr_is_written_retries_until_space_returns(
    tmp_path: Path,
    tiny_model_dir: Path,
    orthanc_factory: Callable[..., Orthanc],
    rigs: list[Rig],
    tmpfs_spool: Callable[[str], Path],
) -> None:
    """The disk fills between ingest and analysis: the SR cannot be written, the job is retried
    with backoff and the reason shows; once space returns it analyses and delivers, once."""
    require_shared_data(TCIA_SIEMENS_B40F)
    files = series_files(TCIA_SIEMENS_B40F)
    spool = tmpfs_spool("24m")
    rig = make_rig(tmp_path, tiny_model_dir, orthanc_factory, quiet_s=3.0)
    assert rig.spool == spool and rig.orthanc is not None
    rigs.append(rig)
    rig.node.start()
    sent = send_files(rig.port, files)
    assert sent.succeeded == set(sent.statuses) and len(sent.statuses) == len(files)
    filler = fill(spool)
    wait_for(
        lambda: "No space left on device" in (jobs(rig.db) or [[""] * 7])[0][6],
        60,
        interval=0.2,
        what="a failed attempt with the reason",
    )
    assert [j[3] for j in jobs(rig.db)] in (["queued"], ["running"])  # retried, not dead
    assert leftovers(rig.spool) == []
    filler.unlink()
    wait_for(lambda: [j[3] for j in jobs(rig.db)] == ["done"], 60, interval=0.5, what="done")
    assert_each_result_once(rig.orthanc, study_uid_of(files), rig.spool)
