"""The Storage SCP: presentation contexts, association admission, and one server loop per process.

Two receive engines share everything here but the protocol machinery (``receiver.engine``): ``fast``
(`node.ul`, the default: a blocking upper layer, one thread per association) and ``pynetdicom``
(pynetdicom's threaded `AssociationServer` with `EdgeAssociation`, the fallback). Either runs on a
listening socket it is *given* (created by `create_listen_socket`), so `node.daemon` can pre-fork
several receiver processes that accept on the same socket — one Python process is bound by the GIL
(issue 2 item 9). Admission (`admit`) is decided before negotiation: the called AE title must be ours;
the calling AE title (and the host, when configured) must be in ``receiver.allowed_callers`` unless
``accept_any_caller``; and a slot of the cross-process ``max_associations`` semaphore must be free
(else a transient "local limit exceeded" reject). Every association ends with one key=value log line
(`log_association`: calling AE, peer, instances, failures, bytes, seconds, outcome). This module does
no SQL and never imports torch.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import _STORAGE_CLASSES  # the full list (pynetdicom's public one stops at 128)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from config.settings import Settings
from node.errors import QueueFullError
from node.handlers import Receiver, ReceivedFileSink, handle_echo, handle_store
from node.records import ReceivedFile, StoreStatus
from node.spool import Spool

log = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
DUL_POLL_SECONDS = 0.0002

#: Accepted as sent. Deflated Explicit VR LE is deliberately absent (decompression bombs, issue 2 item 3).
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# pynetdicom: no identifier/PDU dumps from its standard handlers (PHI and cost), UIDs checked.
_config.LOG_HANDLER_LEVEL = "none"


def storage_sop_class_uids() -> tuple[str, ...]:
    """Every standard storage SOP class pynetdicom knows (170 in 3.0.4), in a stable order."""
    return tuple(sorted(set(str(uid) for uid in _STORAGE_CLASSES.values())))


def supported_contexts() -> list[Any]:
    """Verification plus every storage SOP class with `STORAGE_TRANSFER_SYNTAXES` (no 128 limit as SCP)."""
    contexts = [build_context(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]
    contexts += [build_context(uid, list(STORAGE_TRANSFER_SYNTAXES)) for uid in storage_sop_class_uids()]
    return contexts


class Slots(Protocol):
    """A counting semaphore shared by every receiver process (``receiver.max_associations``)."""

    def acquire(self, block: bool = ...) -> bool: ...

    def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RejectDecision:
    """A-ASSOCIATE-RJ parameters (PS3.8 §9.3.4) and the reason for the log line."""

    result: int
    source: int
    diagnostic: int
    reason: str


def decide_admission(settings: Settings, calling_ae_title: str, called_ae_title: str, peer_host: str) -> RejectDecision | None:
    """Pure admission policy: ``None`` to accept, or why and how to reject.

    Parameters
    ----------
    calling_ae_title, called_ae_title
        From the A-ASSOCIATE-RQ, trailing spaces removed.
    peer_host
        The peer's IP address.
    """
    r = settings.receiver
    if called_ae_title != r.ae_title.strip():
        return RejectDecision(0x01, 0x01, 0x07, "called_ae_title_not_ours")
    if r.accept_any_caller:
        return None
    for caller in r.allowed_callers:
        if caller.ae_title == calling_ae_title and (caller.host is None or _host_matches(caller.host, peer_host)):
            return None
    if any(c.ae_title == calling_ae_title for c in r.allowed_callers):
        return RejectDecision(0x01, 0x01, 0x03, "calling_host_not_allowed")
    return RejectDecision(0x01, 0x01, 0x03, "unknown_calling_ae_title")


def _host_matches(allowed: str, peer_host: str) -> bool:
    if allowed == peer_host:
        return True
    try:
        return peer_host in {info[4][0] for info in socket.getaddrinfo(allowed, None)}
    except OSError:
        return False


class AssociationStats:
    """Counters for one association's log line (touched only by its own thread)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.instances = 0
        self.failures = 0
        self.bytes = 0

    def record(self, status: int, size_bytes: int) -> None:
        if status == StoreStatus.SUCCESS:
            self.instances += 1
            self.bytes += size_bytes
        else:
            self.failures += 1


class EdgeAssociation(Association):
    """An acceptor association that releases its admission slot and logs one line when it ends."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.edge_stats = AssociationStats()
        self.edge_slots: Slots | None = None
        self.edge_reject_reason = ""
        # pynetdicom's DUL thread sleeps this long whenever the socket had nothing for it; the 1 ms
        # default adds up to 1 ms to every C-STORE round trip (measured: ~85 → ~115 images/s on one
        # association on a loaded 2-core box). 0.2 ms keeps an idle association at a few % of a core.
        self.dul._run_loop_delay = DUL_POLL_SECONDS

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            if self.edge_slots is not None:
                self.edge_slots.release()
                self.edge_slots = None
            self._log_summary()

    def _log_summary(self) -> None:
        if self.is_rejected:
            outcome = "rejected"
        elif self.is_released:
            outcome = "released"
        elif self.is_aborted:
            outcome = "aborted"
        else:
            outcome = "closed"
        peer = self.requestor.address_info
        log_association((self.requestor.ae_title or "").strip(), peer.address if peer else "",
                        peer.port if peer else None, self.edge_stats, outcome, self.edge_reject_reason)


def log_association(calling_ae_title: str, peer_host: str, peer_port: int | None, stats: AssociationStats,
                    outcome: str, reason: str = "") -> None:
    """The one ``event=association`` line every association ends with (both engines; no patient data).

    Parameters
    ----------
    outcome
        ``released``, ``aborted``, ``rejected`` or ``closed`` (the peer went away without either).
    reason
        Why it was rejected or aborted (empty: not written).
    """
    log.info(
        "event=association calling_ae=%s peer=%s:%s instances=%d failures=%d bytes=%d seconds=%.3f outcome=%s%s",
        calling_ae_title or "-", peer_host or "-", peer_port if peer_port is not None else "-",
        stats.instances, stats.failures, stats.bytes, time.monotonic() - stats.started, outcome,
        f" reason={reason}" if reason else "",
    )


class EdgeRequestHandler(RequestHandler):
    """Creates `EdgeAssociation` acceptors and turns Nagle off on each accepted socket."""

    def handle(self) -> None:
        try:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().handle()

    def _create_association(self) -> Association:
        from pynetdicom.association import MODE_ACCEPTOR  # type: ignore[attr-defined]

        server = self.server
        assoc = EdgeAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = server.contexts  # read-only during negotiation; no deepcopy
        assoc.requestor.address_info = self.remote
        for event in server._handlers:
            if event.is_intervention and server._handlers[event]:
                assoc.bind(event, *server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class ScpServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a listening socket created elsewhere (possibly shared by processes)."""

    daemon_threads = True

    def __init__(self, ae: Any, listen_socket: socket.socket, ae_title: str, contexts: list[Any],
                 evt_handlers: list[Any]) -> None:
        self._listen_socket = listen_socket
        address = listen_socket.getsockname()
        super().__init__(ae, address, ae_title, contexts, evt_handlers=evt_handlers,
                         request_handler=EdgeRequestHandler)

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self._listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # already listening

    def get_request(self) -> tuple[socket.socket, Any]:
        # Non-blocking listening socket shared by processes: another process may have taken the
        # connection; BlockingIOError (an OSError) makes socketserver skip this wake-up.
        client, address = self.socket.accept()
        client.setblocking(True)
        return client, address

    def server_close(self) -> None:
        self.socket.close()  # never shutdown(): the socket is shared with sibling processes


def create_listen_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen (port 0 = a free port); non-blocking so several processes can accept on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class ThreadQueueSink:
    """A `ReceivedFileSink` over a `queue.Queue` or `multiprocessing.Queue` (bounded)."""

    def __init__(self, q: Any) -> None:
        self.q = q

    def is_full(self) -> bool:
        try:
            return bool(self.q.full())
        except (NotImplementedError, OSError):
            return False

    def put(self, item: ReceivedFile) -> None:
        try:
            self.q.put(item, timeout=1.0)
        except queue.Full:
            raise QueueFullError("indexer queue is full (receiver.queue_size)") from None


class _ShortPollClock:
    """Stands in for the `time` module inside ``pynetdicom.association`` only: polling sleeps of 1 ms
    and less become `DUL_POLL_SECONDS`; longer sleeps are untouched.

    The acceptor's reactor sleeps 1 ms per loop before looking for the next decoded DIMSE message, so
    every C-STORE waits up to 1 ms before its handler runs. Measured with DCMTK storescu on one
    association (100 × 512×512 CT, 4 interleaved runs, loaded 2-core box): the time per image outside
    our handler fell from 5.4–8.7 ms to 4.6–6.1 ms.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(DUL_POLL_SECONDS if 0 < seconds <= 0.001 else seconds)


def tune_pynetdicom_polling() -> None:
    """Install `_ShortPollClock` in ``pynetdicom.association`` (idempotent; receiver processes only)."""
    import pynetdicom.association as association_module

    if not isinstance(association_module.time, _ShortPollClock):
        association_module.time = _ShortPollClock()  # type: ignore[assignment]


_original_get_msg: Any = None


def _get_msg_leaving_responses(self: Any, block: bool = False) -> tuple[Any, Any]:
    """`DIMSEServiceProvider.get_msg` where a non-blocking call takes only a *request* off the queue.

    The one non-blocking caller is the association's reactor, which serves requests; responses are
    for the ``send_*`` call blocked in ``get_msg(block=True)``. pynetdicom pauses its reactor during
    a ``send_*`` with a flag the reactor may already have passed (``_is_paused`` set, checkpoint
    still open), so on a busy CPU the reactor can take the C-STORE-RSP ("Received unexpected C-STORE
    service message") and the sender waits out the whole DIMSE timeout for an instance the peer stored.
    """
    if block:
        return _original_get_msg(self, block=True)
    q = self.msg_queue
    with q.mutex:  # peek and take atomically: the blocked sender takes from the same deque
        if not q.queue:
            return None, None
        _context_id, primitive = q.queue[0]
        if primitive is not None and not primitive.is_valid_request:
            return None, None
        item = q.queue.popleft()
        q.not_full.notify()
        return item


def guard_dimse_responses() -> None:
    """Install `_get_msg_leaving_responses` for every association of this process (idempotent).

    Called wherever this process sends as an SCU with pynetdicom (``edge-node echo``, the demo sender)
    and by the receive engine that runs pynetdicom's reactor.
    """
    global _original_get_msg
    from pynetdicom.dimse import DIMSEServiceProvider

    if DIMSEServiceProvider.get_msg is not _get_msg_leaving_responses:
        _original_get_msg = DIMSEServiceProvider.get_msg
        DIMSEServiceProvider.get_msg = _get_msg_leaving_responses  # type: ignore[method-assign]


def build_ae(settings: Settings) -> Any:
    """The AE with our timeouts and PDU size; contexts are given to the server, not the AE."""
    r = settings.receiver
    ae = AE(ae_title=r.ae_title)
    ae.maximum_pdu_size = r.max_pdu_bytes
    ae.acse_timeout = r.acse_timeout_seconds
    ae.dimse_timeout = r.dimse_timeout_seconds
    ae.network_timeout = r.network_timeout_seconds
    # Admission (incl. the cross-process limit) is ours, in EVT_REQUESTED; pynetdicom's per-process
    # limit only backs it up.
    ae.maximum_associations = max(r.max_associations, 1)
    ae.require_called_aet = False
    ae.require_calling_aet = []
    return ae


def admit(settings: Settings, slots: Slots, calling_ae_title: str, called_ae_title: str,
          peer_host: str) -> RejectDecision | None:
    """`decide_admission`, then take a ``max_associations`` slot: ``None`` = admitted (the caller now
    holds a slot and must release it when the association ends), else the reject to send."""
    decision = decide_admission(settings, calling_ae_title, called_ae_title, peer_host)
    if decision is None and not slots.acquire(False):
        decision = RejectDecision(0x02, 0x03, 0x02, "max_associations_reached")
    return decision


def _handle_requested(event: Any, settings: Settings, slots: Slots) -> None:
    """EVT_REQUESTED: admit or reject before negotiation (notification handler; never raises out)."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    calling = (rq.calling_ae_title or "").strip()
    called = (rq.called_ae_title or "").strip()
    peer = assoc.requestor.address_info.address if assoc.requestor.address_info else ""
    assoc.requestor.ae_title = calling  # for the association log line, also when rejected
    decision = admit(settings, slots, calling, called, peer)
    if decision is None:
        if isinstance(assoc, EdgeAssociation):
            assoc.edge_slots = slots
        return
    if isinstance(assoc, EdgeAssociation):
        assoc.edge_reject_reason = decision.reason
    assoc.acse.send_reject(decision.result, decision.source, decision.diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


class RunningScp:
    """One SCP server loop running in a thread of this process; `stop` drains in-flight associations."""

    def __init__(self, server: ScpServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, wait up to ``timeout`` s for in-flight associations, then close."""
        self.server.shutdown()  # stops serve_forever, closes our socket fd, leaves siblings alone
        deadline = time.monotonic() + timeout
        for assoc in list(self.server.active_associations):
            assoc.join(max(0.0, deadline - time.monotonic()))
        self.thread.join(max(0.0, deadline - time.monotonic()))


class RunningServer(Protocol):
    """What `start_scp` returns, whichever engine: the port, and `stop` that drains in-flight associations."""

    @property
    def port(self) -> int: ...

    def stop(self, timeout: float = ...) -> None: ...


def start_scp(settings: Settings, listen_socket: socket.socket, sink: ReceivedFileSink,
              slots: Slots) -> RunningServer:
    """Serve C-ECHO and C-STORE on ``listen_socket`` in background threads of this process.

    ``receiver.engine`` picks the receive engine: ``fast`` (`node.ul`, the default) or ``pynetdicom``
    (pynetdicom's own association machinery, the fallback). Either result has ``port`` and
    ``stop(timeout)``.
    """
    s = settings.storage
    spool = Spool(s.data_dir, fsync=s.fsync, min_free_mb=s.min_free_mb,
                  on_changed_content=settings.receiver.on_changed_content)
    receiver = Receiver(spool, sink)
    if settings.receiver.engine == "fast":
        from node.ul import start_fast_scp  # local: node.ul imports this module

        return start_fast_scp(settings, listen_socket, receiver, slots)
    tune_pynetdicom_polling()
    guard_dimse_responses()
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_REQUESTED, _handle_requested, [settings, slots]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
    ]
    server = ScpServer(ae, listen_socket, settings.receiver.ae_title, supported_contexts(), handlers)
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="scp-accept",
                              daemon=True)
    thread.start()
    return RunningScp(server, thread)
