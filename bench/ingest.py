"""Ingest benchmark: the same CT series sent by DCMTK ``storescu`` to edge-node, ``storescp`` and Orthanc.

The bench generates one CT series (default 300 slices of 512×512 int16, about 157 MB), writes it
once to a scratch folder (``--work-dir``, default ``bench/out``: on the real disk, since fsync on a
tmpfs costs nothing), and then, in the same run, sends it over loopback (127.0.0.1) to each
receiver, each started by the bench with its own fresh storage folder for every run:

* edge-node: ``edge-node serve`` with a generated config (own ``data_dir``, ``fsync = true``, the
  bench's AE title in ``allowed_callers``, the analysis worker off so only ingest is measured;
  ``--engine`` picks ``receiver.engine``, default ``fast``);
* DCMTK ``storescp --fork`` (no fsync: the ceiling a plain C++ receiver reaches);
* Orthanc with its own JSON config (own storage and index folder, ``StorageCompression false``,
  ``SyncStorageArea true`` which makes Orthanc fsync every stored file, any AE allowed to store).

Each receiver is measured with one association and with 4 parallel senders (the files split into
4 parts, one ``storescu`` process per part), at least 3 runs each; runs of the receivers are
interleaved so that noise from other load on the machine spreads over all of them. Every sender
runs with ``TCP_NODELAY=1``: Debian's DCMTK otherwise keeps Nagle's algorithm on, which caps any
receiver near 20 images/s through delayed ACKs. All receivers negotiate the same maximum PDU.

After every run the bench checks that each receiver stored every instance (edge-node: ``edge-node
status --json``; storescp: files in its folder; Orthanc: its REST ``/statistics``). It prints a table
(median images/s and MB/s per receiver and mode, and the ratios edge-node/storescp and
edge-node/Orthanc) and writes the same as JSON to ``bench/out/ingest.json``. Processes and temporary
folders are cleaned up on success, failure, Ctrl-C and SIGTERM.

Run: ``.venv/bin/python bench/ingest.py [--runs 3] [--slices 300]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence


BENCH_AE = "BENCH"
HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout: import models from the repository
    sys.path.insert(0, str(HERE.parent))
DEFAULT_OUT = HERE / "out" / "ingest.json"
READY_SECONDS = 60.0
VERIFY_SECONDS = 120.0
SEND_SECONDS = 900.0


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what failed and where its log is."""


# --------------------------------------------------------------------------------------------------
# The series


def write_ct_series(folder: Path, slices: int, size: int, seed: int = 300) -> list[Path]:
    """Write a synthetic chest CT series (`models.phantoms`), one Explicit VR Little Endian file per slice.

    Parameters
    ----------
    folder
        Folder to write the files into (created if missing).
    slices, size
        Number of slices and rows = columns (pixels); int16 pixels, so 300 × 512 × 512 is ≈ 157 MB.
    seed
        Phantom seed, so repeated benchmarks send the same bytes.

    Returns
    -------
    list[Path]
        The files, in slice order.
    """
    from models.phantoms import generate_phantom, write_phantom_series

    phantom = generate_phantom(seed, shape_zyx=(slices, size, size))
    return write_phantom_series(phantom, folder, patient_name="BENCH^PHANTOM", patient_id="BENCH0001",
                                series_description="Bench chest CT (synthetic)")


# --------------------------------------------------------------------------------------------------
# Process helpers


def tool(name: str) -> str:
    """Path of an external command, or a `BenchError` that names the Debian package."""
    path = shutil.which(name)
    if path is None:
        package = {"storescu": "dcmtk", "storescp": "dcmtk", "echoscu": "dcmtk", "Orthanc": "orthanc"}.get(name, name)
        raise BenchError(f"{name} is not installed; install the Debian package {package} (apt-get install {package})")
    return path


def sender_env() -> dict[str, str]:
    """Environment of every DCMTK child: Nagle off (DCMTK reads TCP_NODELAY from the environment)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(what: str, check: Callable[[], bool], deadline_s: float, interval_s: float = 0.1,
         alive: Callable[[], str | None] | None = None) -> None:
    """Call ``check`` until it returns true; raise `BenchError` after ``deadline_s`` seconds.

    ``alive`` returns a message when the process being waited for has died, which ends the wait early.
    """
    end = time.monotonic() + deadline_s
    while True:
        if check():
            return
        if alive is not None:
            dead = alive()
            if dead:
                raise BenchError(f"{what}: {dead}")
        if time.monotonic() > end:
            raise BenchError(f"{what}: not done within {deadline_s:.0f} s")
        time.sleep(interval_s)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Process:
    """A child process in its own session (so Ctrl-C reaches only us and we stop it in order)."""

    def __init__(self, argv: Sequence[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log = log
        self._log_fh = open(log, "wb")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env if env is not None else sender_env(), start_new_session=True,
        )

    def dead(self) -> str | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        return f"{Path(self.argv[0]).name} exited with {rc}; last lines of {self.log}:\n{tail(self.log)}"

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL the whole process group."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # forked children (storescp --fork, workers)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._log_fh.close()


def echo_ok(port: int, called_ae: str) -> bool:
    """One C-ECHO from the bench's AE title; true when the peer answered success."""
    rc = subprocess.run(
        [tool("echoscu"), "-q", "-to", "2", "-ta", "5", "-aet", BENCH_AE, "-aec", called_ae, "127.0.0.1", str(port)],
        env=sender_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20,
    ).returncode
    return rc == 0


# --------------------------------------------------------------------------------------------------
# Receivers


class Receiver:
    """A receiver the bench can start fresh, send to, count and stop."""

    name = "?"
    ae_title = "?"
    tool_names = "echoscu"

    def start(self, folder: Path) -> int:
        """Start with empty storage under ``folder``; return the DICOM port once it answers C-ECHO."""
        raise NotImplementedError

    def stored(self) -> int:
        """Instances stored so far."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class EdgeNode(Receiver):
    name = "edge-node"
    ae_title = "EDGE_NODE"

    def __init__(self, pdu_bytes: int, engine: str = "fast"):
        self.pdu_bytes = pdu_bytes
        self.engine = engine
        self.proc: Process | None = None
        self.config: Path | None = None

    def command(self) -> list[str]:
        script = Path(sys.executable).with_name("edge-node")
        if script.exists():
            return [str(script)]
        found = shutil.which("edge-node")
        if found:
            return [found]
        return [sys.executable, "-m", "node.cli"]

    def describe(self) -> str:
        return (f"edge-node serve (engine {self.engine}, fsync on, max PDU {self.pdu_bytes}, "
                "analysis worker off)")

    def start(self, folder: Path) -> int:
        data_dir = folder / "var"
        self.config = folder / "edge-node.toml"
        self.config.write_text(
            "# generated by bench/ingest.py\n"
            "[receiver]\n"
            f'ae_title = "{self.ae_title}"\n'
            'host = "127.0.0.1"\n'
            "port = 0\n"
            f'allowed_callers = [ {{ ae_title = "{BENCH_AE}" }} ]\n'
            f"max_pdu_bytes = {self.pdu_bytes}\n"
            f'engine = "{self.engine}"\n'
            "[storage]\n"
            f'data_dir = "{data_dir}"\n'
            "fsync = true\n"
            "[pipeline]\n"
            "enabled = false\n"
            "[log]\n"
            'level = "INFO"\n',
            encoding="utf-8",
        )
        log = folder / "edge-node.log"
        self.proc = Process([*self.command(), "serve", "--config", str(self.config)], log, cwd=folder)
        port: list[int] = []

        def listening() -> bool:
            for line in log.read_text(errors="replace").splitlines():
                if "event=listening" in line:
                    for part in line.split():
                        if part.startswith("port="):
                            port.append(int(part[len("port="):]))
                            return True
            return False

        poll("edge-node start (log line event=listening)", listening, READY_SECONDS, alive=self.proc.dead)
        poll("edge-node C-ECHO", lambda: echo_ok(port[0], self.ae_title), READY_SECONDS, 0.2, alive=self.proc.dead)
        return port[0]

    def stored(self) -> int:
        if self.config is None:
            raise BenchError("edge-node was not started")
        result = subprocess.run(
            [*self.command(), "status", "--config", str(self.config), "--json"],
            capture_output=True, text=True, timeout=60, cwd=self.config.parent,
        )
        if result.returncode != 0:
            return -1
        indexed = int(json.loads(result.stdout).get("instances", -1))
        # Both must agree: the files in the spool (what was acknowledged) and the index rows.
        spooled = sum(1 for _ in (self.config.parent / "var" / "spool" / "instances").rglob("*.dcm"))
        return min(indexed, spooled)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class StoreSCP(Receiver):
    name = "storescp"
    ae_title = "STORESCP"
    tool_names = "storescp"

    def __init__(self, pdu_bytes: int):
        self.pdu_bytes = pdu_bytes
        self.proc: Process | None = None
        self.out: Path | None = None

    def describe(self) -> str:
        return f"DCMTK storescp --fork (no fsync; max PDU {self.pdu_bytes})"

    def start(self, folder: Path) -> int:
        self.out = folder / "storescp"
        self.out.mkdir()
        port = free_port()
        self.proc = Process(
            [tool("storescp"), "--fork", "-dhl", "-aet", self.ae_title, "-pdu", str(self.pdu_bytes),
             "-od", str(self.out), str(port)],
            folder / "storescp.log", cwd=folder,
        )
        poll("storescp C-ECHO", lambda: echo_ok(port, self.ae_title), READY_SECONDS, 0.2, alive=self.proc.dead)
        return port

    def stored(self) -> int:
        if self.out is None:
            raise BenchError("storescp was not started")
        return sum(1 for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class Orthanc(Receiver):
    name = "orthanc"
    ae_title = "ORTHANC"
    tool_names = "Orthanc"

    def __init__(self, pdu_bytes: int):
        self.pdu_bytes = pdu_bytes
        self.proc: Process | None = None
        self.http_port = 0

    def describe(self) -> str:
        return f"Orthanc (SyncStorageArea true = fsync on, StorageCompression false, max PDU {self.pdu_bytes})"

    def start(self, folder: Path) -> int:
        storage = folder / "orthanc-storage"
        storage.mkdir()
        port, self.http_port = free_port(), free_port()
        config = {
            "Name": "bench-orthanc",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            # Orthanc's durability switch: fsync() after every write to the storage area.
            "SyncStorageArea": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"bench": [BENCH_AE, "127.0.0.1", 104]},
            "MaximumPduLength": self.pdu_bytes,
            "SaveJobs": False,
            "OverwriteInstances": False,
        }
        path = folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        self.proc = Process([tool("Orthanc"), "--no-jobs", str(path)], folder / "orthanc.log", cwd=folder)
        poll("Orthanc C-ECHO", lambda: echo_ok(port, self.ae_title), READY_SECONDS, 0.2, alive=self.proc.dead)
        return port

    def stored(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(json.load(response)["CountInstances"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


# --------------------------------------------------------------------------------------------------
# Sending and measuring


@dataclass
class Run:
    seconds: float
    images_per_s: float
    mb_per_s: float


@dataclass
class Result:
    receiver: str
    mode: str
    senders: int
    runs: list[Run] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return statistics.median(r.images_per_s for r in self.runs) if self.runs else float("nan")

    @property
    def mb_per_s(self) -> float:
        return statistics.median(r.mb_per_s for r in self.runs) if self.runs else float("nan")


def split(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """``parts`` contiguous chunks of nearly equal length."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return [chunk for chunk in out if chunk]


def send(files: Sequence[Path], port: int, called_ae: str, senders: int, pdu_bytes: int, folder: Path) -> float:
    """Send ``files`` with ``senders`` parallel ``storescu`` processes; return the wall time in seconds.

    ``-R`` proposes only the presentation contexts the files need (CT Image Storage with the
    uncompressed syntaxes, Explicit VR Little Endian first on this little-endian machine), so the
    files go as stored, without conversion.
    """
    procs = []
    started = time.perf_counter()
    try:
        for i, chunk in enumerate(split(files, senders)):
            argv = [tool("storescu"), "-R", "-aet", BENCH_AE, "-aec", called_ae, "-pdu", str(pdu_bytes),
                    "-ta", "30", "127.0.0.1", str(port), *map(str, chunk)]
            procs.append(Process(argv, folder / f"storescu-{i}.log", cwd=folder))
        deadline = time.monotonic() + SEND_SECONDS
        for p in procs:
            left = max(1.0, deadline - time.monotonic())
            try:
                rc = p.proc.wait(left)
            except subprocess.TimeoutExpired:
                raise BenchError(f"storescu did not finish within {SEND_SECONDS:.0f} s; see {p.log}") from None
            if rc != 0:
                raise BenchError(f"storescu exited with {rc}; last lines of {p.log}:\n{tail(p.log)}")
        return time.perf_counter() - started
    finally:
        for p in procs:
            p.stop(grace_s=2)


def measure(receiver: Receiver, files: Sequence[Path], total_bytes: int, senders: int, pdu_bytes: int,
            folder: Path) -> Run:
    """One run: fresh receiver, send everything, check every instance was stored, stop."""
    folder.mkdir(parents=True)
    try:
        port = receiver.start(folder)
        seconds = send(files, port, receiver.ae_title, senders, pdu_bytes, folder)
        expected = len(files)
        counted: list[int] = [0]

        def all_stored() -> bool:
            counted[0] = receiver.stored()
            return counted[0] == expected

        try:
            poll(f"{receiver.name}: all {expected} instances stored", all_stored, VERIFY_SECONDS, 0.5)
        except BenchError:
            raise BenchError(f"{receiver.name} stored {counted[0]} of {expected} instances") from None
        return Run(seconds=seconds, images_per_s=expected / seconds, mb_per_s=total_bytes / 1e6 / seconds)
    finally:
        receiver.stop()
        shutil.rmtree(folder, ignore_errors=True)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b and b == b and a == a else None


def print_table(results: list[Result]) -> dict[str, dict[str, float | None]]:
    print()
    print(f"{'receiver':<11} {'mode':<12} {'images/s':>9} {'MB/s':>8}   runs (images/s)")
    for r in results:
        runs = ", ".join(f"{x.images_per_s:.0f}" for x in r.runs)
        print(f"{r.receiver:<11} {r.mode:<12} {r.images_per_s:>9.1f} {r.mb_per_s:>8.1f}   {runs}")
    by = {(r.receiver, r.mode): r for r in results}
    ratios: dict[str, dict[str, float | None]] = {}
    for mode in dict.fromkeys(r.mode for r in results):
        edge = by.get(("edge-node", mode))
        if edge is None:
            continue
        values = {f"edge-node/{other}": ratio(edge.images_per_s, by[(other, mode)].images_per_s)
                  for other in ("storescp", "orthanc") if (other, mode) in by}
        if values:
            ratios[mode] = values
    if ratios:
        print()
        for mode, values in ratios.items():
            text = "  ".join(f"{k} = {v:.2f}x" if v is not None else f"{k} = n/a" for k, v in values.items())
            print(f"ratios, {mode}: {text}")
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per receiver and mode (default 3)")
    parser.add_argument("--slices", type=int, default=300, help="slices in the CT series (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--senders", type=int, default=4, help="parallel storescu processes (default 4)")
    parser.add_argument("--pdu", type=int, default=131072,
                        help="max PDU bytes every receiver and sender negotiates (default 131072)")
    parser.add_argument("--receivers", default="edge-node,storescp,orthanc",
                        help="comma-separated subset of edge-node,storescp,orthanc")
    parser.add_argument("--engine", choices=("fast", "pynetdicom"), default="fast",
                        help="edge-node's receiver.engine (default fast)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_OUT.parent,
                        help="folder for the series and the receivers' storage, removed afterwards; put it on the "
                             "disk you want measured, not on a tmpfs where fsync is free (default bench/out)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.slices < 1 or args.senders < 1:
        parser.error("--runs, --slices and --senders must be at least 1")

    factories = {"edge-node": EdgeNode, "storescp": StoreSCP, "orthanc": Orthanc}
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    unknown = [n for n in names if n not in factories]
    if unknown or not names:
        parser.error(f"unknown receiver(s) {unknown}; choose from {', '.join(factories)}")
    receivers: list[Receiver] = [EdgeNode(args.pdu, args.engine) if n == "edge-node" else factories[n](args.pdu)
                                 for n in names]

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edge-node-bench-", dir=args.work_dir))
    modes = [("single", 1), (f"{args.senders} senders", args.senders)] if args.senders > 1 else [("single", 1)]
    results = {(r.name, mode): Result(r.name, mode, n) for r in receivers for mode, n in modes}
    try:
        for t in ("storescu", "echoscu", *(r.tool_names for r in receivers)):
            tool(t)  # fail before the long part when a tool is missing
        series = work / "series"
        series.mkdir()
        print(f"generating {args.slices} slices {args.size}x{args.size} int16 in {series} ...", flush=True)
        t0 = time.perf_counter()
        files = write_ct_series(series, args.slices, args.size)
        total_bytes = sum(p.stat().st_size for p in files)
        print(f"  {len(files)} files, {total_bytes / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s", flush=True)
        print("senders: DCMTK storescu -R (Explicit VR Little Endian), environment TCP_NODELAY=1 (Nagle off), "
              f"max PDU {args.pdu}, to 127.0.0.1", flush=True)
        for r in receivers:
            print(f"receiver {r.name}: {r.describe()}", flush=True)
        for run in range(1, args.runs + 1):
            for mode, senders in modes:
                for receiver in receivers:
                    folder = work / f"{receiver.name}-{senders}-{run}"
                    one = measure(receiver, files, total_bytes, senders, args.pdu, folder)
                    results[(receiver.name, mode)].runs.append(one)
                    print(f"run {run}/{args.runs} {receiver.name:<9} {mode:<10} {one.seconds:6.2f} s "
                          f"{one.images_per_s:7.1f} images/s {one.mb_per_s:7.1f} MB/s  all {len(files)} stored",
                          flush=True)
        ordered = [results[(r.name, mode)] for mode, _ in modes for r in receivers]
        ratios = print_table(ordered)
        load = os.getloadavg()
        print(f"\nNote: medians of the runs above; load average now {load[0]:.1f} on {os.cpu_count()} CPUs "
              "(other work on the machine makes figures noisy).")
        report = {
            "when_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15": [round(x, 2) for x in load],
            "series": {"slices": args.slices, "rows": args.size, "columns": args.size, "files": len(files),
                       "bytes": total_bytes, "transfer_syntax": "Explicit VR Little Endian"},
            "senders": {"tool": "DCMTK storescu -R", "env": {"TCP_NODELAY": "1"}, "max_pdu_bytes": args.pdu,
                        "parallel": args.senders},
            "receivers": {r.name: r.describe() for r in receivers},
            "runs_per_mode": args.runs,
            "results": [
                {"receiver": r.receiver, "mode": r.mode, "senders": r.senders,
                 "median_images_per_s": round(r.images_per_s, 2), "median_mb_per_s": round(r.mb_per_s, 2),
                 "runs": [asdict(x) for x in r.runs]}
                for r in ordered
            ],
            "ratios": ratios,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.out}")
        return 0
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        for r in receivers:
            r.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
