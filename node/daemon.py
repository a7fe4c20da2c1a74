"""Composition of ``edge-node serve``: the receiver's processes and threads, start-up and shutdown.

Start-up, in this order: prepare the spool folders, migrate the index, reconcile it with the spool
(nothing is accepted before that), bind the listening socket (port 0 = a free port), fork
``receiver.processes`` SCP processes (0 = two per CPU core, see `receiver_process_count`; each runs
the receive engine ``receiver.engine`` names, see `node.scp.start_scp`) that share the socket, the
bounded queue to the indexer and the ``max_associations`` semaphore, then start the indexer and scheduler threads here
in the parent, log ``event=listening ... port=N`` and tell systemd READY. Processes are forked before
any thread starts. A receiver process dies with the parent (PR_SET_PDEATHSIG), so a ``kill -9`` of
``serve`` never leaves a process holding the port; the spool makes that crash lossless.

SIGTERM/SIGINT: STOPPING, each receiver process stops accepting and lets its in-flight associations
finish (up to ``dimse_timeout_seconds``), the indexer drains the queue, exit 0. With ``import.enabled``
the watched import folder (`node.watch`) runs here in the parent too and feeds the same queue. If a receiver process
dies unexpectedly the node stops and exits 1 (systemd restarts it; nothing acknowledged is lost).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from config.settings import Settings
from node import notify
from node.db import connect
from node.indexer import Indexer, reconcile
from node.migrations import migrate
from node.scheduler import Scheduler
from node.spool import Spool

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _receiver_process(settings: Settings, listen_socket: socket.socket, q: Any, slots: Any, parent_pid: int) -> None:
    """Body of one forked receiver process: serve until SIGTERM, then drain and exit 0."""
    _die_with_parent(parent_pid)
    from node.scp import ThreadQueueSink, start_scp

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    running = start_scp(settings, listen_socket, ThreadQueueSink(q), slots)
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            break
    running.stop(timeout=settings.receiver.dimse_timeout_seconds)
    q.close()
    q.join_thread()  # every ReceivedFile handed over reaches the pipe before we exit


def receiver_process_count(settings: Settings, cpu_count: int | None = None) -> int:
    """``receiver.processes``; 0 means two per CPU core, at least 4, at most ``max_associations``.

    More processes than cores pays because a durable store spends a large part of each instance
    waiting in fsync: with 4 parallel storescu senders on the 2-core box, 4 processes received
    172-198 images/s where 2 processes received 116-162 (interleaved runs, same load).
    """
    r = settings.receiver
    if r.processes:
        return r.processes
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, min(max(2 * cores, 4), r.max_associations))


def serve(settings: Settings) -> int:
    """Run the receiver in the foreground until SIGTERM/SIGINT; return the exit code (0 clean, 1 failure)."""
    r = settings.receiver
    s = settings.storage
    spool = Spool(s.data_dir, fsync=s.fsync, min_free_mb=s.min_free_mb, on_changed_content=r.on_changed_content)
    spool.prepare()
    db = connect(spool.database_path)
    applied = migrate(db)
    if applied:
        log.info("event=migrated applied=%s", ",".join(applied))
    reconcile(spool, db)
    db.conn.close()

    listen_socket = _bind(r.host, r.port)
    port = int(listen_socket.getsockname()[1])
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue(maxsize=r.queue_size)
    slots = ctx.BoundedSemaphore(r.max_associations)
    children = []
    for i in range(receiver_process_count(settings)):
        p = ctx.Process(target=_receiver_process, args=(settings, listen_socket, q, slots, os.getpid()),
                        name=f"edge-node-receiver-{i}", daemon=False)
        p.start()
        children.append(p)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    indexer = Indexer(spool, q)
    indexer.start()
    scheduler = Scheduler(spool.database_path, settings.completion)
    scheduler.start()
    watcher = None
    if settings.import_.enabled:
        from node.handlers import Receiver
        from node.scp import ThreadQueueSink
        from node.watch import ImportWatcher

        watcher = ImportWatcher(settings.import_.dir, Receiver(spool, ThreadQueueSink(q)),
                                settings.import_.settle_seconds)
        watcher.start()

    line = (f"event=listening ae_title={r.ae_title} host={r.host} port={port} processes={len(children)} "
            f"engine={r.engine}")
    log.info(line)
    print(line, flush=True)
    notify.ready(f"listening on port {port}")

    exit_code = 0
    watchdog_interval = notify.watchdog_interval_seconds()
    next_ping = 0.0
    while not stop.wait(0.5):
        if watchdog_interval and time.monotonic() >= next_ping:
            notify.watchdog()
            next_ping = time.monotonic() + watchdog_interval
        dead = [p for p in children if not p.is_alive()]
        if dead:
            log.error("event=receiver_process_died exitcode=%s action=stop", dead[0].exitcode)
            exit_code = 1
            break

    notify.stopping()
    log.info("event=stopping")
    for p in children:
        if p.is_alive() and p.pid:
            os.kill(p.pid, signal.SIGTERM)
    try:
        # Stop listening for every process at once: new connections are refused, not left queued
        # in the backlog while in-flight associations finish.
        listen_socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    for p in children:
        p.join(r.dimse_timeout_seconds + 5)
        if p.is_alive():
            log.warning("event=receiver_process_killed pid=%s", p.pid)
            p.kill()
            p.join(5)
    listen_socket.close()
    if watcher is not None:
        watcher.stop()
    indexer.stop()
    scheduler.stop()
    log.info("event=stopped indexed=%d", indexer.indexed)
    return exit_code


def _bind(host: str, port: int) -> socket.socket:
    from node.scp import create_listen_socket

    try:
        return create_listen_socket(host, port)
    except OSError as exc:
        log.error("event=bind_failed host=%s port=%d error=%s", host, port, exc.strerror)
        print(f"edge-node: cannot listen on {host}:{port} ({exc.strerror}); pick a free port "
              "(receiver.port) or stop the process using it", file=sys.stderr)
        raise SystemExit(1) from None
