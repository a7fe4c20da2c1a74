"""``edge-node serve`` as a real process: crash safety, clean shutdown, DCMTK peers, logs, status, echo."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from pydicom.uid import generate_uid

from tests.node.conftest import (
    CANARY_VALUES,
    REPO,
    ServeProcess,
    make_ct,
    make_series,
    send,
    status_json,
    wait_for,
    write_config,
    write_datasets,
)
from tests.support import free_port, require_tool, tool_env


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _send_until_broken(port: int, datasets, acknowledged: list[str]) -> None:
    """C-STORE one by one over one association, recording each acknowledged SOP Instance UID."""
    from pynetdicom import AE

    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_NODE")
    try:
        for ds in datasets:
            if not assoc.is_established:
                return
            rsp = assoc.send_c_store(ds)
            if "Status" in rsp and rsp.Status == 0x0000:
                acknowledged.append(ds.SOPInstanceUID)
            else:
                return
    finally:
        if assoc.is_established:
            assoc.abort()


def test_kill9_mid_association_then_restart_and_resend_loses_nothing(tmp_path, serve_factory):
    import threading

    from node.db import connect

    config = write_config(tmp_path, completion={"quiet_seconds": 4.0, "check_interval_seconds": 0.2})
    study, series_uid = generate_uid(), generate_uid()
    slices = [make_ct(study, series_uid, i, size=256) for i in range(40)]
    first = serve_factory(config)
    acknowledged: list[str] = []
    sender = threading.Thread(target=_send_until_broken, args=(first.port, slices, acknowledged))
    sender.start()
    wait_for(lambda: len(acknowledged) >= 5, what="a few acknowledged instances")
    first.kill9()  # in the middle of the association; the receiver processes die with it
    sender.join(30)
    assert 5 <= len(acknowledged) < len(slices)
    second = serve_factory(config)
    assert send(second.port, slices) == [0] * len(slices)  # the sender resends the whole study
    wait_for(lambda: status_json(config)["jobs"]["PENDING"] == 1, timeout=30, what="the study to complete")
    status = status_json(config)
    assert (status["studies"], status["series"], status["instances"]) == (1, 1, len(slices))
    [recent] = status["recent_studies"]
    assert (recent["state"], recent["generation"], recent["instances"]) == ("DISPATCHED", 1, len(slices))
    assert list((tmp_path / "data" / "spool" / "tmp").iterdir()) == []
    assert second.terminate() == 0
    assert second.stderr().count("event=study_completed") == 1
    db = connect(tmp_path / "data" / "index.sqlite3")
    rows = db.execute("SELECT sop_instance_uid, count(*) FROM instances GROUP BY sop_instance_uid").fetchall()
    db.conn.close()
    counts = dict(rows)
    assert all(counts.get(uid) == 1 for uid in acknowledged)


def test_acknowledged_instances_survive_kill9_without_any_resend(tmp_path, serve_factory):
    import threading

    config = write_config(tmp_path, completion={"quiet_seconds": 1.0, "check_interval_seconds": 0.2})
    slices = make_series(30, size=256)
    first = serve_factory(config)
    acknowledged: list[str] = []
    sender = threading.Thread(target=_send_until_broken, args=(first.port, slices, acknowledged))
    sender.start()
    wait_for(lambda: len(acknowledged) >= 3, what="a few acknowledged instances")
    first.kill9()
    sender.join(30)
    second = serve_factory(config)  # start-up reconciliation indexes whatever the crash left unindexed
    wait_for(lambda: status_json(config)["jobs"]["PENDING"] == 1, timeout=30, what="the study to complete")
    assert second.terminate() == 0
    from node.db import connect

    db = connect(tmp_path / "data" / "index.sqlite3")
    indexed = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances").fetchall()}
    db.conn.close()
    assert set(acknowledged) <= indexed


def test_sigterm_lets_the_in_flight_association_finish_and_exits_0(tmp_path, serve_factory):
    from pynetdicom import AE

    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(20)
    config = write_config(tmp_path)
    proc = ServeProcess(config, tmp_path / "logs", env_extra={"NOTIFY_SOCKET": str(notify_path)})
    try:
        proc.wait_listening()
        assert listener.recv(1024).startswith(b"READY=1")
        series = make_series(6)
        ae = AE(ae_title="TEST_SCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", proc.port, ae_title="EDGE_NODE")
        assert assoc.is_established
        assert [assoc.send_c_store(ds).Status for ds in series[:3]] == [0] * 3
        proc.proc.send_signal(15)
        assert listener.recv(1024) == b"STOPPING=1"
        assert [assoc.send_c_store(ds).Status for ds in series[3:]] == [0] * 3  # still served
        assoc.release()
        assert proc.proc.wait(30) == 0
        # no longer accepting
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proc.port), timeout=2).close()
    finally:
        proc.close()
        listener.close()
    assert status_json(config)["instances"] == 6


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_dcmtk_storescu_and_echoscu_against_serve(tmp_path, serve_factory):
    storescu = require_tool("storescu")
    echoscu = require_tool("echoscu")
    config = write_config(tmp_path)
    proc = serve_factory(config)
    env = tool_env()
    echo = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", "EDGE_NODE", "127.0.0.1", str(proc.port)],
                          env=env, capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    files = write_datasets(make_series(5), tmp_path / "src")
    store = subprocess.run([storescu, "-aet", "STORESCU", "-aec", "EDGE_NODE", "127.0.0.1", str(proc.port),
                            *map(str, files)], env=env, capture_output=True, text=True, timeout=60)
    assert store.returncode == 0, store.stderr
    # an unknown calling AE is rejected: storescu fails and nothing is stored
    intruder = subprocess.run([storescu, "-aet", "INTRUDER", "-aec", "EDGE_NODE", "127.0.0.1", str(proc.port),
                               str(files[0])], env=env, capture_output=True, text=True, timeout=30)
    assert intruder.returncode != 0
    assert "rejected" in (intruder.stderr + intruder.stdout).lower()
    # a malformed Study Instance UID: storescu reports the exact failure status
    bad = make_ct("1.2.3/../x", generate_uid(), 0)
    [bad_path] = write_datasets([bad], tmp_path / "bad")
    failed = subprocess.run([storescu, "-d", "-aet", "STORESCU", "-aec", "EDGE_NODE", "127.0.0.1", str(proc.port),
                             str(bad_path)], env=env, capture_output=True, text=True, timeout=30)
    assert "0xc010" in (failed.stderr + failed.stdout).lower()
    wait_for(lambda: status_json(config)["instances"] == 5, what="5 indexed instances")
    assert proc.terminate() == 0


def test_logs_never_contain_canary_patient_data_at_debug_level(tmp_path, serve_factory):
    config = write_config(tmp_path, log={"level": "DEBUG"},
                          completion={"quiet_seconds": 0.5, "check_interval_seconds": 0.1})
    proc = serve_factory(config)
    series = make_series(3)
    bad = make_ct(generate_uid(), generate_uid(), 0)
    del bad.SeriesInstanceUID
    assert send(proc.port, series + [bad]) == [0, 0, 0, 0xC011]
    wait_for(lambda: status_json(config)["jobs"]["PENDING"] == 1, what="completion")
    assert proc.terminate() == 0
    logs = proc.stderr() + proc.stdout_path.read_text()
    assert "event=association" in logs and "event=study_completed" in logs
    for value in CANARY_VALUES:
        assert value not in logs


def test_status_json_counts_and_recent_studies_have_no_patient_data(tmp_path, serve_factory):
    config = write_config(tmp_path)
    proc = serve_factory(config)
    assert send(proc.port, make_series(3)) == [0, 0, 0]
    wait_for(lambda: status_json(config)["instances"] == 3, what="indexing")
    status = status_json(config)
    assert set(status) >= {"studies", "series", "instances", "jobs", "recent_studies"}
    assert set(status["jobs"]) >= {"PENDING", "RUNNING", "SUCCEEDED", "FAILED"}
    assert status["recent_studies"][0]["modalities"] == ["CT"]
    assert not any(v in json.dumps(status) for v in CANARY_VALUES)
    table = _cli("status", "--config", str(config))
    assert table.returncode == 0 and "instances 3" in table.stdout
    assert proc.terminate() == 0


def test_echo_command_exit_codes(tmp_path, serve_factory):
    config = write_config(tmp_path)
    proc = serve_factory(config)
    ok = _cli("echo", f"EDGE_NODE@127.0.0.1:{proc.port}", "--calling-ae", "ECHOSCU")
    assert ok.returncode == 0, ok.stderr
    rejected = _cli("echo", f"EDGE_NODE@127.0.0.1:{proc.port}", "--calling-ae", "NOBODY")
    assert rejected.returncode == 3
    unreachable = _cli("echo", f"EDGE_NODE@127.0.0.1:{free_port()}", "--timeout", "3")
    assert unreachable.returncode == 3
    assert _cli("echo", "no-port-here").returncode == 2
    assert proc.terminate() == 0


def test_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path):
    config = write_config(tmp_path, receiver={"port": 70000})
    out = _cli("serve", "--config", str(config))
    assert out.returncode == 2 and "receiver.port" in out.stderr


def test_receiver_never_imports_torch():
    code = ("import sys, node.cli, node.daemon, node.scp, node.indexer, node.scheduler, node.state;"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_max_associations_holds_across_receiver_processes(tmp_path, serve_factory):
    from pynetdicom import AE

    from tests.node.conftest import associate_result

    config = write_config(tmp_path, receiver={"max_associations": 2, "processes": 3})
    proc = serve_factory(config)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", proc.port, ae_title="EDGE_NODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        for _ in range(3):  # whichever process accepts, the shared limit answers
            assert associate_result(proc.port) == (False, (0x02, 0x03, 0x02))
    finally:
        for a in held:
            a.release()
    wait_for(lambda: associate_result(proc.port)[0], what="a free slot after release")
    assert proc.terminate() == 0
