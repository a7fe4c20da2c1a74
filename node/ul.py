"""The fast receive engine (``receiver.engine = "fast"``): the DICOM upper layer with a blocking data phase.

One thread per association reads whole PDUs from its socket (``recv_into`` a preallocated buffer), walks
the PDV items of each P-DATA-TF, assembles the command set and the dataset, stores through the same
`node.handlers.store_status` path as the pynetdicom engine and answers with one P-DATA-TF (the command
set encoded by hand, one ``sendall``). No polling, no event queues, no Dataset objects on the way:
pynetdicom's DUL/reactor machinery costs about 3 ms of CPU per instance (issue 2 item 9; measured
6.1-6.8 ms against 3.3-3.7 ms for this engine per 512 KiB instance, docs/operations.md). Association establishment still uses
pynetdicom's own PDU codecs and `negotiate_as_acceptor`, and admission is `node.scp.admit` with the
same reject parameters, reasons and ``event=association`` log line as the pynetdicom engine.

Protocol errors (malformed or unexpected PDUs, a PDU longer than the maximum we announced, timeouts)
abort only their own association with one log line. This module does no SQL, never builds a path and
never logs attribute values other than AE titles.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import threading
import time
from typing import Any

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from config.settings import Settings
from node.handlers import Receiver, encode_file_meta, store_status
from node.records import StoreStatus
from node.scp import AssociationStats, Slots, admit, log_association, supported_contexts

log = logging.getLogger(__name__)

# PDU types (PS3.8 §9.3.1)
A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_ABORT_TYPE = 0x07

#: Largest A-ASSOCIATE-RQ read: 128 contexts × 12 transfer syntaxes are about 45 KiB.
MAX_ASSOCIATE_RQ_BYTES = 1 << 20
#: How long a process already serving associations waits before taking a new connection, per association.
ACCEPT_DEFER_SECONDS = 0.002
#: After an A-ABORT: how long and how much of the peer's in-flight data we read before closing.
ABORT_LINGER_SECONDS = 0.5
ABORT_DRAIN_BYTES = 8 << 20
#: After an A-ASSOCIATE-RJ: how long we wait for the requestor to close the connection (PS3.8's
#: ARTIM wait, state Sta13) before closing it ourselves.
REJECT_LINGER_SECONDS = 2.0
#: Upper bound on a P-DATA-TF body when ``receiver.max_pdu_bytes = 0`` (unlimited) was announced.
UNLIMITED_PDU_BYTES = (1 << 32) - 1

# DIMSE command fields (PS3.7 §E.1) and statuses
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
UNRECOGNISED_OPERATION = 0x0211
VERIFICATION_SOP_CLASS = b"1.2.840.10008.1.1\x00"

_A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT_HEADER = struct.Struct("<HHI")


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: abort this association (``reason`` goes to the log)."""

    def __init__(self, reason: str, provider_reason: int = 0x02) -> None:
        super().__init__(reason)
        self.reason = reason
        self.provider_reason = provider_reason  # A-ABORT reason (PS3.8 §9.3.8): 0x01 unrecognised, 0x02 unexpected PDU…


class PeerClosed(Exception):
    """The peer closed the TCP connection."""


def parse_command(raw: bytes | bytearray) -> dict[int, bytes]:
    """Decode a DIMSE command set (group 0000, Implicit VR Little Endian) into ``{element: value bytes}``.

    Raises
    ------
    ProtocolError
        An element runs past the end, or an element is not in group 0000.
    """
    elements: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 8 > end:
            raise ProtocolError("malformed_command_set", 0x06)
        group, element, length = _ELEMENT_HEADER.unpack_from(raw, offset)
        offset += 8
        if group != 0x0000 or length == 0xFFFFFFFF or offset + length > end:
            raise ProtocolError("malformed_command_set", 0x06)
        elements[element] = bytes(raw[offset:offset + length])
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    if value is None or len(value) != 2:
        return None
    return int.from_bytes(value, "little")


def _uid_text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").strip("\x00 ")


def _even(value: bytes) -> bytes:
    return value + b"\x00" if len(value) % 2 else value


def encode_response(context_id: int, command_field: int, message_id: int, status: int,
                    sop_class_uid: bytes | None, sop_instance_uid: bytes | None) -> bytes:
    """A whole P-DATA-TF PDU holding one response command set (Implicit VR LE, no dataset; PS3.7 §9.3).

    ``sop_class_uid``/``sop_instance_uid`` are the request's raw values (echoed, not re-encoded);
    ``None`` leaves the element out.
    """
    parts = []
    if sop_class_uid is not None:
        value = _even(sop_class_uid)
        parts.append(_ELEMENT_HEADER.pack(0, 0x0002, len(value)) + value)
    parts.append(struct.pack("<HHIH", 0, 0x0100, 2, command_field))
    parts.append(struct.pack("<HHIH", 0, 0x0120, 2, message_id))
    parts.append(struct.pack("<HHIH", 0, 0x0800, 2, NO_DATASET))
    parts.append(struct.pack("<HHIH", 0, 0x0900, 2, status))
    if sop_instance_uid is not None:
        value = _even(sop_instance_uid)
        parts.append(_ELEMENT_HEADER.pack(0, 0x1000, len(value)) + value)
    body = b"".join(parts)
    command = struct.pack("<HHII", 0, 0x0000, 4, len(body)) + body
    return _HEADER.pack(P_DATA_TF_TYPE, 6 + len(command)) + _PDV_HEADER.pack(2 + len(command), context_id, 0x03) + command


def _abort_pdu(provider_reason: int) -> bytes:
    """A-ABORT from the service provider (source 0x02) with ``provider_reason`` (PS3.8 §9.3.8)."""
    return bytes((A_ABORT_TYPE, 0, 0, 0, 0, 4, 0, 0, 0x02, provider_reason))


class UpperLayerAssociation:
    """One accepted TCP connection, served start to end by the calling thread (`run`).

    Parameters
    ----------
    server
        The `FastScpServer` that accepted it (settings, receiver, slots, contexts).
    sock
        The connected socket (blocking); closed when `run` returns.
    peer
        ``(host, port)`` of the peer.
    """

    def __init__(self, server: FastScpServer, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        self.server = server
        self.sock = sock
        self.peer_host = str(peer[0]) if peer else ""
        self.peer_port: int | None = int(peer[1]) if peer and len(peer) > 1 else None
        self.stats = AssociationStats()
        self.calling_ae_title = ""
        self.outcome = "closed"
        self.reason = ""
        self._holds_slot = False
        self._contexts: dict[int, UID] = {}  # accepted context ID -> transfer syntax
        self._header = bytearray(6)
        r = server.settings.receiver
        self.max_pdu_bytes = r.max_pdu_bytes or UNLIMITED_PDU_BYTES
        self._buffer = bytearray(min(self.max_pdu_bytes, 1 << 20))

    # -- reading ---------------------------------------------------------------------------------
    def _set_timeout(self, seconds: float) -> None:
        """Kernel receive/send timeouts on the blocking socket (expiry raises BlockingIOError).

        Not `socket.settimeout`: with a Python-level timeout every ``recv_into`` is preceded by a
        ``poll`` system call, about 15 extra calls per 512 KiB instance.
        """
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def _recv_exact(self, view: memoryview, n: int) -> None:
        got = 0
        recv_into = self.sock.recv_into
        while got < n:
            k = recv_into(view[got:n])
            if k == 0:
                raise PeerClosed()
            got += k

    def _read_pdu(self, limit: int) -> tuple[int, memoryview]:
        """Read one PDU; return its type and a view of its body (valid until the next read)."""
        header = self._header
        self._recv_exact(memoryview(header), 6)
        pdu_type, length = _HEADER.unpack(header)
        if length > limit:
            raise ProtocolError(f"pdu_too_large type=0x{pdu_type:02X} length={length} limit={limit}", 0x06)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)[:length]
        self._recv_exact(view, length)
        return pdu_type, view

    # -- the association -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve the connection until release, abort, close or a protocol error; never raises."""
        r = self.server.settings.receiver
        try:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self.sock.settimeout(None)
            self._set_timeout(r.acse_timeout_seconds)
            if self._establish():
                self._set_timeout(r.network_timeout_seconds)
                self._data_phase()
        except ProtocolError as exc:
            self._abort(exc.reason, exc.provider_reason)
        except (socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO/SO_SNDTIMEO expired
            self._abort("timeout", 0x00)
        except PeerClosed:
            pass  # outcome stays "closed" (or what was set before)
        except OSError as exc:
            self.outcome = "closed"
            self.reason = f"socket_error_{errno.errorcode.get(exc.errno or 0, 'unknown').lower()}"
        except Exception as exc:  # a thread's outermost loop: log, abort this association only
            log.error("event=association_failed calling_ae=%s error_type=%s", self.calling_ae_title or "-",
                      type(exc).__name__)
            self._abort("internal_error", 0x00)
        finally:
            if self._holds_slot:
                self.server.slots.release()
                self._holds_slot = False
            try:
                self.sock.close()
            except OSError:
                pass
            log_association(self.calling_ae_title, self.peer_host, self.peer_port, self.stats, self.outcome,
                            self.reason)

    def _abort(self, reason: str, provider_reason: int) -> None:
        self.outcome = "aborted"
        self.reason = reason.split(" ", 1)[0]
        log.warning("event=association_aborted calling_ae=%s peer=%s reason=%s", self.calling_ae_title or "-",
                    self.peer_host or "-", reason)
        try:
            self.sock.settimeout(ABORT_LINGER_SECONDS)
            self.sock.sendall(_abort_pdu(provider_reason))
            # Close gracefully: closing with unread bytes would send a TCP reset, which can destroy
            # the A-ABORT before the peer reads it. Read what is in flight (bounded), then close.
            self.sock.shutdown(socket.SHUT_WR)
            self._read_until_peer_closes(ABORT_LINGER_SECONDS)
        except OSError:
            pass

    def _read_until_peer_closes(self, seconds: float) -> None:
        """Read and drop what the peer sends until it closes, for at most ``seconds`` and
        `ABORT_DRAIN_BYTES`; socket errors end the wait."""
        deadline = time.monotonic() + seconds
        drained = 0
        try:
            self.sock.settimeout(seconds)
            while drained < ABORT_DRAIN_BYTES and time.monotonic() < deadline:
                n = self.sock.recv_into(self._buffer)
                if n == 0:
                    break
                drained += n
        except OSError:
            pass

    def _establish(self) -> bool:
        """Read the A-ASSOCIATE-RQ, admit and negotiate; send AC (return True) or RJ (return False)."""
        pdu_type, body = self._read_pdu(MAX_ASSOCIATE_RQ_BYTES)
        if pdu_type == A_ABORT_TYPE:
            self.outcome = "aborted"
            return False
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise ProtocolError(f"unexpected_pdu type=0x{pdu_type:02X} before association", 0x02)
        try:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(bytes(self._header) + bytes(body))
            rq = pdu.to_primitive()
            calling = (rq.calling_ae_title or "").strip()
            called = (rq.called_ae_title or "").strip()
            rq_contexts = rq.presentation_context_definition_list
            rq_roles = {
                item.sop_class_uid: (item.scu_role, item.scp_role)
                for item in rq.user_information if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
            }
        except Exception:
            raise ProtocolError("malformed_associate_rq", 0x06) from None
        self.calling_ae_title = calling
        settings = self.server.settings
        decision = admit(settings, self.server.slots, calling, called, self.peer_host)
        if decision is not None:
            reject = A_ASSOCIATE()
            reject.result = decision.result
            reject.result_source = decision.source
            reject.diagnostic = decision.diagnostic
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(reject)
            self.sock.sendall(rj.encode())
            self.outcome = "rejected"
            self.reason = decision.reason
            # PS3.8 (Sta13): the requestor closes after an RJ. Closing first races the reject: a
            # requestor that sees the connection end before it has processed the RJ reports a
            # dropped connection instead of "rejected, local limit exceeded".
            self._read_until_peer_closes(REJECT_LINGER_SECONDS)
            return False
        self._holds_slot = True
        result, ac_roles = negotiate_as_acceptor(rq_contexts, self.server.contexts, rq_roles)
        self._contexts = {
            int(cx.context_id): UID(cx.transfer_syntax[0])
            for cx in result if cx.result == 0x00 and cx.context_id is not None
        }
        accept = A_ASSOCIATE()
        accept.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        accept.calling_ae_title = rq.calling_ae_title
        accept.called_ae_title = rq.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = (
            [cx for cx in result if cx.result == 0x00] + [cx for cx in result if cx.result != 0x00]
        )
        accept.user_information = [*self.server.user_information, *ac_roles]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        self.sock.sendall(ac.encode())
        return True

    def _data_phase(self) -> None:
        """P-DATA-TF, A-RELEASE-RQ and A-ABORT until the association ends."""
        command = bytearray()
        elements: dict[int, bytes] | None = None  # the current message's decoded command set
        dataset: bytearray | None = None  # file meta + dataset fragments (C-STORE), else None
        meta_length = 0
        context_id = -1
        r = self.server.settings.receiver
        # Between messages the peer may stay silent up to network_timeout_seconds; once a message has
        # begun, each further PDU must come within dimse_timeout_seconds.
        idle_timeout = r.network_timeout_seconds
        message_timeout = min(r.dimse_timeout_seconds, r.network_timeout_seconds)
        current_timeout = idle_timeout
        while True:
            wanted = message_timeout if (context_id != -1 or command) else idle_timeout
            if wanted != current_timeout:
                self._set_timeout(wanted)
                current_timeout = wanted
            pdu_type, body = self._read_pdu(self.max_pdu_bytes)
            if pdu_type == A_RELEASE_RQ_TYPE:
                if elements is not None or command:
                    log.warning("event=release_mid_message calling_ae=%s", self.calling_ae_title or "-")
                self.sock.sendall(_A_RELEASE_RP)
                self.outcome = "released"
                return
            if pdu_type == A_ABORT_TYPE:
                self.outcome = "aborted"
                self.reason = "peer_abort"
                return
            if pdu_type != P_DATA_TF_TYPE:
                raise ProtocolError(f"unexpected_pdu type=0x{pdu_type:02X}", 0x02 if pdu_type <= 0x07 else 0x01)
            offset, end = 0, len(body)
            while offset < end:
                if offset + 6 > end:
                    raise ProtocolError("malformed_pdv", 0x06)
                item_length, pdv_context, control = _PDV_HEADER.unpack_from(body, offset)
                if item_length < 2 or offset + 4 + item_length > end:
                    raise ProtocolError("malformed_pdv", 0x06)
                fragment = body[offset + 6:offset + 4 + item_length]
                offset += 4 + item_length
                if pdv_context not in self._contexts:
                    raise ProtocolError(f"unknown_presentation_context id={pdv_context}", 0x06)
                if context_id == -1:
                    context_id = pdv_context
                elif pdv_context != context_id:
                    raise ProtocolError("presentation_context_changed_mid_message", 0x06)
                if control & 0x01:  # command fragment
                    if elements is not None:
                        raise ProtocolError("command_fragment_after_command", 0x06)
                    command += fragment
                    if not control & 0x02:
                        continue
                    elements = parse_command(command)
                    command.clear()
                    if _us(elements, 0x0800) == NO_DATASET:
                        self._dispatch(context_id, elements, None, 0)
                        elements, context_id = None, -1
                    elif _us(elements, 0x0100) == C_STORE_RQ:
                        meta = encode_file_meta(_uid_text(elements.get(0x0002)), _uid_text(elements.get(0x1000)),
                                                str(self._contexts[context_id]))
                        meta_length = len(meta)
                        dataset = bytearray(meta)
                else:  # dataset fragment
                    if elements is None:
                        raise ProtocolError("dataset_fragment_before_command", 0x06)
                    if dataset is not None:
                        dataset += fragment
                    if control & 0x02:
                        self._dispatch(context_id, elements, dataset, meta_length)
                        elements, dataset, context_id = None, None, -1

    def _dispatch(self, context_id: int, elements: dict[int, bytes], dataset: bytearray | None,
                  meta_length: int) -> None:
        """Answer one complete DIMSE request."""
        command_field = _us(elements, 0x0100)
        message_id = _us(elements, 0x0110)
        if command_field is None or message_id is None:
            raise ProtocolError("command_set_without_command_field_or_message_id", 0x06)
        if command_field == C_STORE_RQ:
            sop_class = elements.get(0x0002)
            sop_instance = elements.get(0x1000)
            if dataset is None:
                status = StoreStatus.UNREADABLE_DATASET
                self.stats.record(status, 0)
            else:
                status = store_status(self.server.receiver, lambda: dataset, _uid_text(sop_instance),
                                      self.calling_ae_title)
                self.stats.record(status, len(dataset) - meta_length)
            self.sock.sendall(encode_response(context_id, 0x8001, message_id, int(status), sop_class, sop_instance))
        elif command_field == C_ECHO_RQ:
            self.sock.sendall(encode_response(context_id, 0x8030, message_id, 0x0000,
                                              elements.get(0x0002, VERIFICATION_SOP_CLASS), None))
        elif command_field == C_CANCEL_RQ:
            pass  # nothing of ours is cancellable; C-CANCEL has no response
        elif command_field & 0x8000:
            raise ProtocolError(f"unexpected_response command_field=0x{command_field:04X}", 0x02)
        else:
            log.warning("event=unsupported_operation calling_ae=%s command_field=0x%04X status=0x0211",
                        self.calling_ae_title or "-", command_field)
            self.sock.sendall(encode_response(context_id, command_field | 0x8000, message_id, UNRECOGNISED_OPERATION,
                                              elements.get(0x0002), elements.get(0x1000)))


class FastScpServer:
    """Accepts on a (possibly shared, non-blocking) listening socket; one thread per association.

    Parameters
    ----------
    settings
        ``receiver.*`` timeouts, PDU size and admission.
    listen_socket
        From `node.scp.create_listen_socket`; sibling processes may accept on it too.
    receiver
        The store path (`node.handlers.Receiver`).
    slots
        The cross-process ``max_associations`` semaphore.
    """

    def __init__(self, settings: Settings, listen_socket: socket.socket, receiver: Receiver, slots: Slots) -> None:
        self.settings = settings
        self.listen_socket = listen_socket
        self.receiver = receiver
        self.slots = slots
        self.contexts: list[PresentationContext] = supported_contexts()
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = settings.receiver.max_pdu_bytes
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        self.user_information: list[Any] = [max_length, class_uid, version]
        self.port = int(listen_socket.getsockname()[1])
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    def serve_forever(self) -> None:
        """Accept until `shutdown`; a connection another process took is skipped."""
        sock = self.listen_socket
        poller = select.poll()  # not select(): no limit on the descriptor number
        poller.register(sock, select.POLLIN)
        while not self._stopping.is_set():
            try:
                readable = poller.poll(200)
            except OSError:
                self._stopping.wait(0.2)
                continue
            if any(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, mask in readable):
                self._stopping.wait(0.2)  # shut down under us (daemon stopping): wait for shutdown()
                continue
            if not readable:
                continue
            busy = len(self._threads)
            if busy:
                # Every process sharing the socket wakes up; let one without associations take it, so
                # parallel senders spread over processes (one process is bound by the GIL).
                self._stopping.wait(ACCEPT_DEFER_SECONDS * min(busy, 4))
            try:
                client, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # a sibling process took it
            except OSError:
                self._stopping.wait(0.2)
                continue
            if self._stopping.is_set():
                client.close()
                break
            client.setblocking(True)
            thread = threading.Thread(target=self._serve, args=(client, address), daemon=True,
                                      name=f"ul-{address[1] if len(address) > 1 else '-'}")
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, client: socket.socket, address: tuple[Any, ...]) -> None:
        try:
            UpperLayerAssociation(self, client, address).run()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self) -> None:
        """Stop accepting (in-flight associations go on)."""
        self._stopping.set()

    def active_threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)


class RunningFastScp:
    """A `FastScpServer` accepting in a thread of this process; `stop` drains in-flight associations."""

    def __init__(self, server: FastScpServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, wait up to ``timeout`` s for in-flight associations, then close our socket fd."""
        self.server.shutdown()
        deadline = time.monotonic() + timeout
        self.thread.join(max(0.0, deadline - time.monotonic()))
        for thread in self.server.active_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        self.server.listen_socket.close()  # this process's fd only; never shutdown() a shared socket


def start_fast_scp(settings: Settings, listen_socket: socket.socket, receiver: Receiver, slots: Slots) -> RunningFastScp:
    """Serve C-ECHO and C-STORE with the fast engine on ``listen_socket`` in background threads."""
    server = FastScpServer(settings, listen_socket, receiver, slots)
    thread = threading.Thread(target=server.serve_forever, name="ul-accept", daemon=True)
    thread.start()
    return RunningFastScp(server, thread)
