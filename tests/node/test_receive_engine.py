"""The fast receive engine (`node.ul`) next to the pynetdicom one: same statuses, rejects and log lines;
protocol errors abort only their own association; release; DCMTK with several presentation contexts."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.records import StoreStatus
from tests.node.conftest import (
    SCU_AE,
    associate_result,
    encode_associate_rq,
    make_ct,
    make_series,
    raw_release,
    read_pdu,
    send,
    wait_for,
    write_datasets,
)
from tests.node.test_bundled_files import _dataset_bytes, _with_consistent_meta
from tests.support import require_tool, tool_env

ENGINES = ["fast", "pynetdicom"]
VERIFICATION = "1.2.840.10008.1.1"


# -- the same behaviour with both engines -------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_store_echo_and_statuses_are_the_same_with_either_engine(node_factory, engine):
    from pynetdicom import AE

    node = node_factory(sub=engine, scheduler=False, receiver={"engine": engine})
    series = make_series(3, size=128)
    bad = make_ct(series[0].StudyInstanceUID, generate_uid(), 9)
    del bad.SeriesInstanceUID
    assert send(node.port, series + [bad]) == [0x0000, 0x0000, 0x0000, StoreStatus.BAD_SERIES_INSTANCE_UID]
    node.wait_indexed(3)
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="EDGE_NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@pytest.mark.parametrize("engine", ENGINES)
def test_rejects_and_the_association_log_line_are_the_same_with_either_engine(node_factory, caplog, engine):
    node = node_factory(sub=engine, scheduler=False, receiver={"engine": engine, "max_associations": 1})
    with caplog.at_level(logging.INFO, logger="node.scp"):
        _, first = _raw_associate(node.port)
        try:
            assert associate_result(node.port) == (False, (0x02, 0x03, 0x02))
        finally:
            raw_release(first)
        wait_for(lambda: associate_result(node.port)[0], what="the slot released")
        assert associate_result(node.port, calling_ae="INTRUDER") == (False, (0x01, 0x01, 0x03))
        assert associate_result(node.port, called_ae="SOMEBODY_ELSE") == (False, (0x01, 0x01, 0x07))
        wanted = ("calling_ae=INTRUDER", "reason=unknown_calling_ae_title", "reason=called_ae_title_not_ours",
                  "reason=max_associations_reached", "outcome=rejected", "outcome=released", "peer=127.0.0.1:")
        wait_for(lambda: all(w in caplog.text for w in wanted), what="the association log lines")


@pytest.mark.parametrize("engine", ENGINES)
def test_dcmtk_echo_and_small_pdus_over_many_fragments_store_byte_exact(node_factory, tmp_path, engine):
    storescu, echoscu = require_tool("storescu"), require_tool("echoscu")
    node = node_factory(sub=engine, scheduler=False, receiver={"engine": engine, "max_pdu_bytes": 4096})
    echo = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", "EDGE_NODE", "127.0.0.1", str(node.port)],
                          env=tool_env(), capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    [path] = write_datasets(make_series(1, size=128), tmp_path / f"src-{engine}")
    out = subprocess.run([storescu, "-aet", "STORESCU", "-aec", "EDGE_NODE", "--max-pdu", "4096", "127.0.0.1",
                          str(node.port), str(path)], env=tool_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    node.wait_indexed(1)
    rel = node.db().execute("SELECT path FROM instances").fetchone()[0]
    assert _dataset_bytes(node.spool.absolute(rel)) == _dataset_bytes(path)


# -- fast engine: protocol handling -------------------------------------------------------------
def _raw_associate(port: int, contexts: tuple[str, ...] = (VERIFICATION,)) -> tuple[int, socket.socket]:
    """Open an association by hand; return (port, socket) after the A-ASSOCIATE-AC."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(encode_associate_rq([(uid, ["1.2.840.10008.1.2"]) for uid in contexts]))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {pdu_type:#x}"
    return port, sock


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _p_data(context_id: int, control: int, payload: bytes) -> bytes:
    return struct.pack(">BxIIBB", 0x04, 6 + len(payload), 2 + len(payload), context_id, control) + payload


def test_release_is_answered_with_a_release_rp_and_logged(node, caplog):
    with caplog.at_level(logging.INFO, logger="node.scp"):
        _, sock = _raw_associate(node.port)
        assert raw_release(sock) == b"\x06\x00\x00\x00\x00"
        wait_for(lambda: "outcome=released" in caplog.text, what="the association log line")


def test_echo_split_over_two_command_fragments_is_answered(node):
    _, sock = _raw_associate(node.port)
    try:
        command = _command([(0x0002, b"1.2.840.10008.1.1\x00"), (0x0100, struct.pack("<H", 0x0030)),
                            (0x0110, struct.pack("<H", 7)), (0x0800, struct.pack("<H", 0x0101))])
        sock.sendall(_p_data(1, 0x01, command[:10]) + _p_data(1, 0x03, command[10:]))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04 and body[5] == 0x03
        from node.ul import parse_command

        rsp = parse_command(body[6:])
        assert rsp[0x0100] == struct.pack("<H", 0x8030) and rsp[0x0120] == struct.pack("<H", 7)
        assert rsp[0x0900] == b"\x00\x00"
    finally:
        raw_release(sock)


def test_unsupported_operation_answers_0211_and_the_association_goes_on(node):
    _, sock = _raw_associate(node.port)
    try:
        find = _command([(0x0002, b"1.2.840.10008.1.1\x00"), (0x0100, struct.pack("<H", 0x0020)),
                         (0x0110, struct.pack("<H", 3)), (0x0800, struct.pack("<H", 0x0101))])
        sock.sendall(_p_data(1, 0x03, find))
        _, body = read_pdu(sock)
        from node.ul import parse_command

        rsp = parse_command(body[6:])
        assert rsp[0x0100] == struct.pack("<H", 0x8020) and rsp[0x0900] == struct.pack("<H", 0x0211)
    finally:
        assert raw_release(sock) == b"\x06\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\x04\x00" + struct.pack(">I", 131072 + 1) + b"\x00" * 64, "pdu_too_large"),
        (_p_data(1, 0x03, b"\x01\x00\x00\x00"), "malformed_command_set"),
        (struct.pack(">BxI", 0x04, 8) + struct.pack(">IBB", 200, 1, 3) + b"xx", "malformed_pdv"),
        (_p_data(9, 0x03, _command([])), "unknown_presentation_context"),
        (b"\x09\x00\x00\x00\x00\x02\x00\x00", "unexpected_pdu"),
        (_p_data(1, 0x02, b"dataset first"), "dataset_fragment_before_command"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_or_oversize_pdu_aborts_only_that_association(node, caplog, garbage, reason):
    with caplog.at_level(logging.INFO, logger="node"):
        _, sock = _raw_associate(node.port)
        try:
            sock.sendall(garbage)
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x07 and body[2] == 0x02  # A-ABORT from the service provider
        finally:
            sock.close()
        wait_for(lambda: f"outcome=aborted reason={reason}" in caplog.text, what="the association log line")
    assert send(node.port, make_series(1)) == [0x0000]  # the process still serves


def test_garbage_instead_of_an_associate_rq_is_aborted_and_the_next_peer_is_served(node, caplog):
    with caplog.at_level(logging.INFO, logger="node"):
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        try:
            sock.sendall(b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16)
            pdu_type, _ = read_pdu(sock)
            assert pdu_type == 0x07
        finally:
            sock.close()
        wait_for(lambda: "reason=malformed_associate_rq" in caplog.text, what="the abort log line")
    assert send(node.port, make_series(1)) == [0x0000]


def test_peer_that_vanishes_mid_instance_leaves_nothing_and_frees_its_slot(node_factory, caplog):
    node = node_factory(scheduler=False, receiver={"max_associations": 1})
    _, sock = _raw_associate(node.port, contexts=("1.2.840.10008.5.1.4.1.1.2",))
    store = _command([(0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x0100, struct.pack("<H", 0x0001)),
                      (0x0110, struct.pack("<H", 1)), (0x0700, b"\x00\x00"), (0x0800, b"\x00\x00"),
                      (0x1000, b"1.2.3.4\x00")])
    sock.sendall(_p_data(1, 0x03, store) + _p_data(1, 0x00, b"\x08\x00\x16\x00" + b"\x00" * 60))
    sock.close()
    wait_for(lambda: associate_result(node.port)[0], what="the slot freed")
    assert not list(node.spool.iter_instance_paths())
    assert list((node.spool.data_dir / "spool" / "tmp").iterdir()) == []


# -- DCMTK: several presentation contexts, compressed and uncompressed ---------------------------
BUNDLED = ["JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm",
           "MR_small_bigendian.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtdose.dcm", "test-SR.dcm"]


def _storescu_profile(files: list[Path], path: Path) -> Path:
    """A storescu ``--config-file``: one presentation context per (SOP class, transfer syntax) of ``files``."""
    import pydicom

    pairs = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                    for m in (pydicom.dcmread(f, stop_before_pixels=True).file_meta for f in files)})
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Edge]"]
    for i, (sop_class, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{i} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Edge]", "PresentationContexts = Edge"]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def test_dcmtk_storescu_with_many_contexts_compressed_and_uncompressed_is_stored_as_sent(node, tmp_path, caplog):
    import pydicom

    storescu = require_tool("storescu")
    files = [_with_consistent_meta(Path(get_testdata_file(name)), tmp_path / name) for name in BUNDLED]
    files += write_datasets(make_series(2, size=64), tmp_path / "ct")
    profile = _storescu_profile(files, tmp_path / "storescu.cfg")
    with caplog.at_level(logging.INFO, logger="node.scp"):
        out = subprocess.run([storescu, "--config-file", str(profile), "Edge", "-aet", "STORESCU", "-aec", "EDGE_NODE",
                              "127.0.0.1", str(node.port), *map(str, files)],
                             env=tool_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        wait_for(lambda: f"instances={len(files)} failures=0" in caplog.text, what="every instance stored")
    # the MR_small_* variants share one SOP Instance UID: the last one sent is the stored copy
    last_sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    node.wait_indexed(len(last_sent))
    for uid, path in last_sent.items():
        # DCMTK re-encodes the header elements it sends; the transfer syntax and pixel data go as they are
        stored = pydicom.dcmread(node.spool.absolute(node.spool.relative_path_for(uid)))
        source = pydicom.dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID, path.name
        assert stored.get("PixelData") == source.get("PixelData"), path.name


def test_silent_peer_is_aborted_after_network_timeout_and_frees_its_slot(node_factory, caplog):
    node = node_factory(scheduler=False, receiver={"network_timeout_seconds": 0.5, "max_associations": 1})
    with caplog.at_level(logging.INFO, logger="node"):
        _, sock = _raw_associate(node.port)
        try:
            pdu_type, body = read_pdu(sock)  # we say nothing: the node aborts
            assert pdu_type == 0x07 and body[2] == 0x02
        finally:
            sock.close()
        wait_for(lambda: "outcome=aborted reason=timeout" in caplog.text, what="the association log line")
    assert associate_result(node.port)[0]


def _associate_rq_with_roles_and_rejected_contexts() -> bytes:
    from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation, SCP_SCU_RoleSelectionNegotiation

    proposals = [
        ("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2"]),
        (VERIFICATION, ["1.2.840.10008.1.2"]),
        ("1.2.3.4", ["1.2.840.10008.1.2"]),  # not a storage SOP class
        ("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1.99"]),  # deflate only
    ]
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = "1.2.840.10008.5.1.4.1.1.2"
    role.scu_role = role.scp_role = True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    return encode_associate_rq(proposals, (role, window))


def test_associate_ac_is_byte_identical_with_either_engine(node_factory):
    answers = {}
    for engine in ENGINES:
        node = node_factory(sub=f"ac-{engine}", scheduler=False, receiver={"engine": engine})
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        try:
            sock.sendall(_associate_rq_with_roles_and_rejected_contexts())
            answers[engine] = read_pdu(sock)
        finally:
            raw_release(sock)
    assert answers["fast"][0] == 0x02
    assert answers["fast"] == answers["pynetdicom"]


def test_c_echo_and_c_store_responses_are_byte_identical_with_either_engine(node_factory):
    from pynetdicom.dsutils import encode

    ds = make_ct(generate_uid(), generate_uid(), 0, size=16)
    dataset = encode(ds, True, True)  # Implicit VR Little Endian, as the context below
    sop_uid = ds.SOPInstanceUID.encode() + (b"\x00" if len(ds.SOPInstanceUID) % 2 else b"")
    echo = _command([(0x0002, b"1.2.840.10008.1.1\x00"), (0x0100, struct.pack("<H", 0x0030)),
                     (0x0110, struct.pack("<H", 7)), (0x0800, struct.pack("<H", 0x0101))])
    store = _command([(0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x0100, struct.pack("<H", 0x0001)),
                      (0x0110, struct.pack("<H", 8)), (0x0700, b"\x00\x00"), (0x0800, b"\x00\x00"), (0x1000, sop_uid)])
    answers = {}
    for engine in ENGINES:
        node = node_factory(sub=f"rsp-{engine}", scheduler=False, receiver={"engine": engine})
        _, sock = _raw_associate(node.port, contexts=(VERIFICATION, "1.2.840.10008.5.1.4.1.1.2"))
        try:
            sock.sendall(_p_data(1, 0x03, echo))
            echo_rsp = read_pdu(sock)
            sock.sendall(_p_data(3, 0x03, store) + _p_data(3, 0x02, dataset))
            answers[engine] = (echo_rsp, read_pdu(sock))
        finally:
            raw_release(sock)
    from node.ul import parse_command

    assert parse_command(answers["fast"][1][1][6:])[0x0900] == b"\x00\x00"  # stored
    assert answers["fast"] == answers["pynetdicom"]


def test_random_bytes_after_association_never_take_the_process_down(node):
    import random

    rng = random.Random(20261121)
    for _ in range(25):
        _, sock = _raw_associate(node.port)
        try:
            kind = rng.choice((0x04, 0x04, 0x04, 0x05, 0x07, rng.randrange(256)))
            body = rng.randbytes(rng.randrange(0, 64))
            if kind == 0x04 and rng.random() < 0.7:  # a plausible PDV header with random content
                body = struct.pack(">IBB", len(body) + 2, 1, rng.randrange(4)) + body
            sock.sendall(struct.pack(">BxI", kind, len(body)) + body)
            sock.shutdown(socket.SHUT_WR)  # whatever the node waits for next, it gets end of stream
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
        finally:
            sock.close()
    assert send(node.port, make_series(1)) == [0x0000]


class _CheckpointTheReactorAlreadyPassed:
    """pynetdicom's reactor pause as a sender sees it when the reactor had just passed it: the
    reactor reads as paused, yet goes on polling its message queue."""

    def __init__(self, assoc) -> None:
        self.assoc = assoc

    def clear(self) -> None:
        self.assoc._is_paused = True

    def set(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        return True


def test_scu_gets_every_response_even_when_its_reactor_missed_the_pause(node):
    """The race behind a 10 s DIMSE timeout for an instance the peer stored: the SCU's reactor, not
    the waiting ``send_c_store``, took the C-STORE-RSP. With `guard_dimse_responses` (installed for
    every SCU of the product and of these tests) the response stays for the sender."""
    from pynetdicom import AE

    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="EDGE_NODE")
    assert assoc.is_established
    assoc._reactor_checkpoint = _CheckpointTheReactorAlreadyPassed(assoc)  # the reactor polls throughout
    statuses = []
    try:
        for ds in make_series(12):
            if not assoc.is_established:  # pynetdicom aborts after a DIMSE timeout
                break
            statuses.append(int(assoc.send_c_store(ds).get("Status", -1)))
    finally:
        if assoc.is_established:
            assoc.release()
    assert statuses == [StoreStatus.SUCCESS] * 12
