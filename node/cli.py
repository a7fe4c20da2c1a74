"""The ``edge-node`` command: subcommands parse arguments, delegate, and turn errors into exit codes.

Nothing here does work of its own. ``analyze`` imports `pipeline.analyze` only when it is used, so the
receiver commands never import torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config.settings import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

EPILOG = """\
commands:
  serve         run the receiver in the foreground (SIGTERM: finish in-flight associations, exit 0)
  status        counts of studies, series, instances and jobs; recent studies (no patient data)
  echo          C-ECHO a DICOM peer, e.g. edge-node echo PACS@10.0.0.5:104
  check-config  validate a config file and print the effective settings
  analyze       run the analysis pipeline on DICOM files or folders (needs the pipeline package)

exit codes:
  0  success
  1  runtime failure (the node stopped on an error, the database or spool is unusable)
  2  usage or configuration error (the message names the key and the fix)
  3  peer unreachable, association rejected or C-ECHO failed
  4  analyze: no series that a model accepts (nothing analysable)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-node", description="PACS edge node: DICOM receiver, index and analysis.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the receiver in the foreground")
    p.add_argument("--config", required=True, type=Path, help="TOML config file (see config/edge-node.toml)")

    p = sub.add_parser("status", help="show what the node has received and the job counts")
    p.add_argument("--config", required=True, type=Path, help="TOML config file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--recent", type=int, default=10, help="how many recent studies to list (default 10)")

    p = sub.add_parser("echo", help="send a C-ECHO to AE@HOST:PORT")
    p.add_argument("target", help="called AE title, host and port, e.g. EDGE_NODE@127.0.0.1:11112")
    p.add_argument("--calling-ae", default="ECHOSCU", help="our calling AE title (default ECHOSCU)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the peer (default 10)")

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file", type=Path, help="TOML config file")

    p = sub.add_parser("analyze", help="analyse DICOM files or folders (see `edge-node analyze --help`)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["analyze"]:  # its own parser, built only when used (it imports the pipeline)
        return _cmd_analyze(argparse.Namespace(command="analyze", args=argv[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help → 0, usage errors → 2
        return int(exc.code or 0)
    handlers = {
        "serve": _cmd_serve, "status": _cmd_status, "echo": _cmd_echo,
        "check-config": _cmd_check_config, "analyze": _cmd_analyze,
    }
    return handlers[args.command](args)


def console_main() -> int:
    """The installed ``edge-node`` command: `main`, then a quick interpreter exit.

    At exit CPython's last garbage collection walks every object the process still holds; after
    ``analyze`` (torch, the pipeline, highdicom's tables of the standard) that walk took 0.9 s of an
    11 s command. Freezing the heap first leaves those objects to the operating system; exit handlers
    still run and files are closed as usual (results are written and fsynced before `main` returns).
    """
    code = main()
    gc.freeze()
    return code


def _load(path: Path, *, check_dirs: bool = True) -> Settings | None:
    """Load and validate a config file; print the error naming the key and return ``None`` on failure."""
    from config.load import ConfigError, load_settings

    try:
        return load_settings(path, check_dirs=check_dirs)
    except ConfigError as exc:
        print(f"edge-node: config error: {exc}", file=sys.stderr)
        return None


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_USAGE
    from node.daemon import serve
    from node.errors import ReceiverError
    from node.log import setup_logging

    setup_logging(settings.log.level)
    try:
        return serve(settings)
    except ReceiverError as exc:
        logging.getLogger("node.cli").error("event=serve_failed error_type=%s error=%r", type(exc).__name__, str(exc))
        print(f"edge-node: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args.config, check_dirs=False)
    if settings is None:
        return EXIT_USAGE
    import sqlite3

    from node.db import connect
    from node.spool import Spool
    from node.state import get_status

    path = Spool(settings.storage.data_dir).database_path
    if not path.exists():
        print(f"edge-node: no index at {path}; has `edge-node serve` run with this config?", file=sys.stderr)
        return EXIT_FAILURE
    try:
        db = connect(path, read_only=True)
        report = get_status(db, recent=args.recent)
        db.conn.close()
    except sqlite3.Error as exc:
        print(f"edge-node: cannot read the index {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return EXIT_OK
    print(f"studies {report.studies}  series {report.series}  instances {report.instances}  "
          f"missing files {report.missing_files}  quarantined {report.quarantined}  "
          f"skipped series {report.skipped_series}")
    print("jobs    " + "  ".join(f"{k} {v}" for k, v in report.jobs.items()))
    if report.recent:
        print()
        print(f"{'study instance uid':<64}  {'state':<10} {'gen':>3} {'modality':<9} {'series':>6} "
              f"{'instances':>9}  last received")
        for st in report.recent:
            when = _dt.datetime.fromtimestamp(st.last_received_at).isoformat(timespec="seconds")
            print(f"{st.study_instance_uid:<64}  {st.state:<10} {st.generation:>3} {st.modalities or '-':<9} "
                  f"{st.series:>6} {st.instances:>9}  {when}")
    return EXIT_OK


def parse_target(target: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` → (ae_title, host, port); raises ValueError naming the problem."""
    if "@" not in target or ":" not in target.rsplit("@", 1)[1]:
        raise ValueError(f"target {target!r} must look like AE@HOST:PORT, e.g. EDGE_NODE@127.0.0.1:11112")
    ae_title, hostport = target.rsplit("@", 1)
    host, port_text = hostport.rsplit(":", 1)
    if not ae_title or len(ae_title) > 16 or "\\" in ae_title:
        raise ValueError(f"AE title {ae_title!r} must be 1-16 characters without a backslash")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} must be a number between 1 and 65535")
    return ae_title, host.strip("[]"), int(port_text)


def _cmd_echo(args: argparse.Namespace) -> int:
    try:
        ae_title, host, port = parse_target(args.target)
    except ValueError as exc:
        print(f"edge-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pynetdicom import AE

    from node.log import quiet_libraries
    from node.scp import guard_dimse_responses

    quiet_libraries()
    guard_dimse_responses()
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "is unreachable or aborted"
        print(f"echo {ae_title}@{host}:{port}: peer {what}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        print(f"echo {ae_title}@{host}:{port}: failed (status {code})", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"echo {ae_title}@{host}:{port}: success")
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.file)
    if settings is None:
        return EXIT_USAGE
    r = settings.receiver
    print(f"{args.file}: ok (ae_title={r.ae_title} host={r.host} port={r.port} "
          f"data_dir={settings.storage.data_dir} allowed_callers={len(r.allowed_callers)} "
          f"accept_any_caller={str(r.accept_any_caller).lower()})")
    if not r.accept_any_caller and not r.allowed_callers:
        print("warning: receiver.allowed_callers is empty and accept_any_caller is false: nobody can send",
              file=sys.stderr)
    return EXIT_OK


def _cmd_analyze(args: argparse.Namespace) -> int:
    try:
        # Heavy (torch): imported only for this command.
        analyze = importlib.import_module("pipeline.analyze")
    except ImportError as exc:
        print(f"edge-node: the analysis pipeline is not available ({exc}); install the full package "
              "(pip install pacs-edge-node) to use `edge-node analyze`", file=sys.stderr)
        return EXIT_FAILURE
    parser = argparse.ArgumentParser(prog="edge-node analyze",
                                     description="Analyse DICOM files or folders and write SEG and SR results.")
    analyze.add_arguments(parser)
    try:
        parsed = parser.parse_args(args.args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(analyze.run(parsed))


if __name__ == "__main__":
    raise SystemExit(console_main())
