"""Fixtures for the receiver tests: generated DICOM, configs on tmp_path, an in-process node, a real
``edge-node serve`` subprocess, and a pynetdicom SCU that returns exact statuses.

Canary patient data (`CANARY`) is put into every generated instance so any test can check logs.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from config.load import load_settings
from config.settings import Settings

REPO = Path(__file__).resolve().parents[2]

CANARY = {
    "PatientName": "Canaryname^Zebedee",
    "PatientID": "CANARY-ID-77331",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACCCANARY991",
}
CANARY_VALUES = ("Canaryname", "Zebedee", "CANARY-ID-77331", "19010203", "ACCCANARY991")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SCU_AE = "TEST_SCU"


def make_ct(study_uid: str, series_uid: str, index: int, *, sop_uid: str | None = None, size: int = 64,
            with_pixels: bool = True, seed: int = 0) -> Dataset:
    """One CT slice (``size``×``size`` int16) with canary patient data, as a Part 10 dataset."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    sop_uid = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    for k, v in CANARY.items():
        setattr(ds, k, v)
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "test chest"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [-16.0, -16.0, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    if with_pixels:
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        rng = np.random.default_rng(seed * 1000 + index)
        ds.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
    return ds


def make_series(n: int, *, study_uid: str | None = None, series_uid: str | None = None, **kw: Any) -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [make_ct(study_uid, series_uid, i, **kw) for i in range(n)]


def write_datasets(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_config(tmp_path: Path, *, port: int = 0, **sections: dict[str, Any]) -> Path:
    """A TOML config on tmp_path: loopback, port 0, TEST_SCU allowed, fast completion; override by section."""
    base: dict[str, dict[str, Any]] = {
        "receiver": {"ae_title": "EDGE_NODE", "host": "127.0.0.1", "port": port, "max_associations": 8,
                     "allowed_callers": [{"ae_title": SCU_AE}, {"ae_title": "STORESCU"}, {"ae_title": "ECHOSCU"}],
                     "processes": 2, "acse_timeout_seconds": 10.0, "dimse_timeout_seconds": 10.0,
                     "network_timeout_seconds": 10.0},
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 0, "fsync": True},
        "completion": {"quiet_seconds": 1.0, "max_wait_seconds": 120.0, "check_interval_seconds": 0.1},
        "pipeline": {"enabled": False},
        "log": {"level": "INFO"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml(v)}")
    path = tmp_path / "edge-node.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until truthy or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# -- SCU ---------------------------------------------------------------------------------------
def send(port: int, items: Sequence[Dataset | Path], *, calling_ae: str = SCU_AE, called_ae: str = "EDGE_NODE",
         raw_files: bool = False) -> list[int]:
    """C-STORE each item over one association; return the exact statuses (raises if not established)."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    pairs = set()
    for item in items:
        meta = pydicom.dcmread(item, stop_before_pixels=True).file_meta if isinstance(item, Path) else item.file_meta
        pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, ts)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw_files
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        if not assoc.is_established:
            raise ConnectionError("association not established")
        statuses = []
        try:
            for item in items:
                rsp = assoc.send_c_store(item)
                statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        finally:
            assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def encode_associate_rq(proposals: list[tuple[str, list[str]]], extra_user_items: tuple = (), *,
                        calling_ae: str = SCU_AE, called_ae: str = "EDGE_NODE") -> bytes:
    """An A-ASSOCIATE-RQ from ``calling_ae`` to ``called_ae`` (pynetdicom's PDU encoder): one context
    per ``(abstract syntax, transfer syntaxes)``, a 16 KiB maximum length, our class UID,
    ``extra_user_items``."""
    from pynetdicom._globals import APPLICATION_CONTEXT_NAME
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    contexts = []
    for i, (uid, syntaxes) in enumerate(proposals):
        cx = build_context(uid, syntaxes)
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.9999"
    primitive.user_information = [max_length, class_uid, *extra_user_items]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU from ``sock``: its type and body (ConnectionError when the peer closes first)."""
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    pdu_type, length = struct.unpack(">BxI", exact(6))
    return pdu_type, exact(length)


def raw_release(sock: socket.socket) -> bytes:
    """Send an A-RELEASE-RQ on an established association; return the reply PDU (type byte + body)
    and close the socket."""
    try:
        sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        pdu_type, body = read_pdu(sock)
        return bytes([pdu_type]) + body
    finally:
        sock.close()


def associate_result(port: int, *, calling_ae: str = SCU_AE, called_ae: str = "EDGE_NODE") -> tuple[bool, Any]:
    """Try an association; return (established, (result, source, diagnostic) of a reject or None).

    A plain socket, not a pynetdicom requestor: the answer is the node's A-ASSOCIATE-AC or -RJ PDU as
    sent, with no client threads between it and the test (a requestor thread of another library in
    this busy process could miss a reject it was sent). An accepted association is released.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(encode_associate_rq([("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
                                         calling_ae=calling_ae, called_ae=called_ae))
        pdu_type, body = read_pdu(sock)
        if pdu_type == 0x02:  # A-ASSOCIATE-AC: release it (A-RELEASE-RQ, then the node's RP)
            reply = raw_release(sock)
            assert reply[0] == 0x06, f"expected A-RELEASE-RP, got PDU type {reply[0]:#x}"
            return True, None
        if pdu_type == 0x03 and len(body) >= 4:  # A-ASSOCIATE-RJ: reserved, result, source, reason
            return False, (body[1], body[2], body[3])
        return False, None


# -- in-process node ---------------------------------------------------------------------------
@dataclass
class InProcessNode:
    """The receiver's pieces composed in this process (threads, no fork): fast and inspectable."""

    settings: Settings
    port: int
    spool: Any
    q: Any
    running: Any
    indexer: Any
    scheduler: Any | None
    listen_socket: Any

    def db(self) -> Any:
        from node.db import connect

        return connect(self.spool.database_path)

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        db = self.db()
        try:
            return int(db.execute(sql, list(params)).fetchone()[0])
        finally:
            db.conn.close()

    def wait_indexed(self, n: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.count("SELECT count(*) FROM instances") >= n, timeout, what=f"{n} indexed instances")

    def stop(self) -> None:
        self.running.stop(timeout=10)
        self.listen_socket.close()
        self.indexer.stop()
        if self.scheduler is not None:
            self.scheduler.stop()


def start_in_process(settings: Settings, *, scheduler: bool = True) -> InProcessNode:
    from node.db import connect
    from node.indexer import Indexer, reconcile
    from node.migrations import migrate
    from node.scheduler import Scheduler
    from node.scp import ThreadQueueSink, create_listen_socket, start_scp
    from node.spool import Spool

    s = settings.storage
    spool = Spool(s.data_dir, fsync=s.fsync, min_free_mb=s.min_free_mb,
                  on_changed_content=settings.receiver.on_changed_content)
    spool.prepare()
    db = connect(spool.database_path)
    migrate(db)
    reconcile(spool, db)
    db.conn.close()
    q: queue.Queue[Any] = queue.Queue(maxsize=settings.receiver.queue_size)
    sock = create_listen_socket("127.0.0.1", 0)
    running = start_scp(settings, sock, ThreadQueueSink(q), threading.BoundedSemaphore(settings.receiver.max_associations))
    indexer = Indexer(spool, q)
    indexer.start()
    sched = None
    if scheduler:
        sched = Scheduler(spool.database_path, settings.completion)
        sched.start()
    return InProcessNode(settings, running.port, spool, q, running, indexer, sched, sock)


@pytest.fixture(autouse=True, scope="session")
def _scu_guarded_like_the_product() -> None:
    """The SCUs these tests run in-process get the reactor guard the product's own SCUs install."""
    from node.scp import guard_dimse_responses

    guard_dimse_responses()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., InProcessNode]]:
    """``node_factory(**sections)`` starts an in-process node on a config from `write_config`."""
    started: list[InProcessNode] = []

    def factory(sub: str = "", scheduler: bool = True, **sections: Any) -> InProcessNode:
        base = tmp_path / sub if sub else tmp_path
        base.mkdir(parents=True, exist_ok=True)
        settings = load_settings(write_config(base, **sections), env={})
        node = start_in_process(settings, scheduler=scheduler)
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop()


@pytest.fixture
def node(node_factory: Callable[..., InProcessNode]) -> InProcessNode:
    return node_factory()


# -- edge-node serve subprocess ----------------------------------------------------------------
_LISTENING = re.compile(r"event=listening .*port=(\d+)")


class ServeProcess:
    """``python -m node.cli serve --config FILE`` with stdout/stderr captured to files."""

    def __init__(self, config: Path, log_dir: Path, env_extra: dict[str, str] | None = None) -> None:
        self.config = config
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"serve-{time.monotonic_ns()}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.update(env_extra or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                                     cwd=REPO, stdout=self._out, stderr=self._err, env=env)
        self.port = 0

    def wait_listening(self, timeout: float = 20.0) -> int:
        def find() -> int:
            if self.proc.poll() is not None:
                pytest.fail(f"edge-node serve exited {self.proc.returncode}: {self.stderr()[-2000:]}")
            m = _LISTENING.search(self.stdout_path.read_text(errors="replace"))
            return int(m.group(1)) if m else 0

        self.port = wait_for(find, timeout, what="event=listening")
        return self.port

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[[Path], ServeProcess]]:
    procs: list[ServeProcess] = []

    def factory(config: Path) -> ServeProcess:
        p = ServeProcess(config, tmp_path / "logs")
        procs.append(p)
        p.wait_listening()
        return p

    yield factory
    for p in procs:
        p.close()


def status_json(config: Path) -> dict[str, Any]:
    import json

    out = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(config), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
