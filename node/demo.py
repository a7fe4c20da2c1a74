"""``make demo``: the receiver end to end on this machine, with nothing to set up.

Starts ``edge-node serve`` with a copy of the example config (``config/edge-node.toml``) changed only
where a demo must differ (a free port on 127.0.0.1, a temporary data folder, the demo's sender among
``allowed_callers``, a short ``quiet_seconds``), generates a small synthetic chest CT study with
`models.phantoms`, sends it by C-STORE with a pynetdicom SCU, polls ``edge-node status --json`` until
every instance is indexed and the study is complete, prints the status table, and stops the receiver
with SIGTERM. Exit status 0 when all of that worked; 1 with a message naming the step that failed
otherwise. It never leaves a process behind. It does not import the receiver's modules: it drives
the real command line, as an operator would.

Run: ``.venv/bin/python -m node.demo [--slices 40] [--size 256] [--data-dir DIR] [--timeout 120]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

DEMO_AE = "DEMO_SCU"
QUIET_SECONDS = 3
COMPLETE_STATES = ("DISPATCHED",)  # node.records.StudyState once a study is complete


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and where to look."""


@dataclass(frozen=True, slots=True)
class DemoStudy:
    """The study the demo sends: its files and the UIDs to look for in the status output."""

    files: tuple[Path, ...]
    study_instance_uid: str
    series_instance_uid: str


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# Config


def example_config_path() -> Path:
    """The annotated example config shipped with the package."""
    return Path(__file__).resolve().parent.parent / "config" / "edge-node.toml"


def override_toml(text: str, section: str, key: str, literal: str) -> str:
    """Set ``key = literal`` in ``[section]`` of a TOML text, keeping every comment.

    Replaces the key's line when the section has it, else adds the line at the end of the section.
    ``literal`` is a TOML value as written (``"text"``, ``3``, ``[ { ae_title = "X" } ]``).
    """
    lines = text.splitlines()
    current = None
    section_end = None
    key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for i, line in enumerate(lines):
        header = re.match(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
        if header:
            if current == section:
                section_end = i
                break
            current = header.group(1).strip()
            continue
        if current == section and key_re.match(line):
            lines[i] = f"{key} = {literal}"
            return "\n".join(lines) + "\n"
    if current != section and section_end is None:
        lines += ["", f"[{section}]", f"{key} = {literal}"]
    else:
        at = section_end if section_end is not None else len(lines)
        while at > 0 and not lines[at - 1].strip():
            at -= 1
        lines.insert(at, f"{key} = {literal}")
    return "\n".join(lines) + "\n"


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string without control characters is a TOML basic string


def write_demo_config(path: Path, data_dir: Path) -> None:
    """Copy the example config to ``path`` with the demo's changes (see the module docstring)."""
    text = example_config_path().read_text(encoding="utf-8")
    changes = [
        ("receiver", "host", toml_string("127.0.0.1")),
        ("receiver", "port", "0"),
        ("receiver", "allowed_callers", f"[ {{ ae_title = {toml_string(DEMO_AE)}, host = \"127.0.0.1\" }} ]"),
        ("receiver", "accept_any_caller", "false"),
        ("storage", "data_dir", toml_string(str(data_dir))),
        # The demo's disk may be small; the guard itself is exercised by the tests.
        ("storage", "min_free_mb", "0"),
        ("completion", "quiet_seconds", str(QUIET_SECONDS)),
        ("completion", "check_interval_seconds", "0.5"),
        # Ingest only until the analysis pipeline (issue 3) is wired into `serve`.
        ("pipeline", "enabled", "false"),
    ]
    for section, key, literal in changes:
        text = override_toml(text, section, key, literal)
    path.write_text("# edge-node demo: a copy of config/edge-node.toml changed by node/demo.py\n" + text,
                    encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The study


def write_demo_study(folder: Path, slices: int, size: int, seed: int = 2026) -> DemoStudy:
    """Write a synthetic chest CT series (`models.phantoms`, Explicit VR Little Endian) into ``folder``.

    Parameters
    ----------
    folder
        Created if missing; one file per slice.
    slices, size
        Number of slices and rows = columns (pixels); the generator picks spacings that cover a chest.
    seed
        Phantom seed: the same seed gives the same images and UIDs.
    """
    from models.phantoms import generate_phantom, write_phantom_series

    # 5 mm slices: thick enough that 40 slices cover the lungs, thin enough for the models' series
    # criteria (slice thickness at most 5 mm); pixels about 1.4 mm at 256 (a 36 cm field of view).
    pixel_mm = 360.0 / size
    phantom = generate_phantom(seed, shape_zyx=(slices, size, size), spacing_mm=(5.0, pixel_mm, pixel_mm),
                               slice_thickness_mm=5.0)
    files = write_phantom_series(
        phantom, folder, patient_name="DEMO^PHANTOM", patient_id="DEMO0001",
        series_description="Demo chest CT (synthetic)", study_description="CT CHEST demo",
    )
    from pydicom import dcmread

    first = dcmread(files[0], stop_before_pixels=True)
    return DemoStudy(tuple(files), str(first.StudyInstanceUID), str(first.SeriesInstanceUID))


# --------------------------------------------------------------------------------------------------
# The receiver process


def edge_node_command() -> list[str]:
    """The ``edge-node`` console script of this environment, or ``python -m node.cli``."""
    script = Path(sys.executable).with_name("edge-node")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "node.cli"]


def poll(what: str, check: Callable[[], bool], deadline_s: float, interval_s: float = 0.2,
         alive: Callable[[], None] | None = None) -> None:
    """Call ``check`` until it is true; `DemoError` after ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    while not check():
        if alive is not None:
            alive()
        if time.monotonic() > end:
            raise DemoError(f"{what}: not done within {deadline_s:.0f} s")
        time.sleep(interval_s)


class Receiver:
    """``edge-node serve`` as a child in its own process group, its log in a file."""

    def __init__(self, config: Path, log: Path):
        self.config = config
        self.log = log
        self._log_fh = open(log, "wb")
        self.proc = subprocess.Popen(
            [*edge_node_command(), "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
            cwd=config.parent, start_new_session=True,
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    def check_alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            raise DemoError(f"edge-node serve exited early with status {rc}; its log ends with:\n{self.log_tail()}")

    def port(self, deadline_s: float) -> int:
        """Wait for the ``event=listening ... port=N`` log line; return N."""
        found: list[int] = []

        def listening() -> bool:
            match = re.search(r"event=listening\b.*?\bport=(\d+)", self.log.read_text(errors="replace"))
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        poll("edge-node serve start-up (log line event=listening)", listening, deadline_s, alive=self.check_alive)
        return found[0]

    def status(self, *, as_json: bool) -> str:
        argv = [*edge_node_command(), "status", "--config", str(self.config)] + (["--json"] if as_json else [])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=self.config.parent)
        if result.returncode != 0:
            raise DemoError(f"edge-node status exited with {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL the group if it does not stop. Return the exit status, or None if killed."""
        rc: int | None = None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                rc = None
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # a worker child left behind must not outlive us
            except (ProcessLookupError, PermissionError):
                pass
            if rc is None:
                self.proc.wait(5)
        finally:
            self._log_fh.close()
        return rc


# --------------------------------------------------------------------------------------------------
# Sending and checking


def send_study(study: DemoStudy, port: int, called_ae: str) -> int:
    """C-STORE every file over one association; return how many were answered 0x0000."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from node.scp import guard_dimse_responses

    guard_dimse_responses()
    ae = AE(ae_title=DEMO_AE)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise DemoError(f"association to {called_ae}@127.0.0.1:{port} was not accepted (see the receiver log)")
    ok = 0
    try:
        for path in study.files:
            status = assoc.send_c_store(dcmread(path))
            code = getattr(status, "Status", None)
            if code == 0x0000:
                ok += 1
            else:
                say(f"  {path.name}: status {'none' if code is None else f'0x{code:04X}'}")
    finally:
        assoc.release()
        ae.shutdown()
    return ok


def recent_studies(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``recent_studies`` list of ``edge-node status --json``."""
    value = status.get("recent_studies")
    return [s for s in value if isinstance(s, dict)] if isinstance(value, list) else []


def study_state(status: dict[str, Any], study_instance_uid: str) -> str | None:
    """The state of our study in ``edge-node status --json`` (the only study in the demo's index)."""
    studies = recent_studies(status)
    for entry in studies:
        if entry.get("study_instance_uid") == study_instance_uid:
            return str(entry.get("state"))
    if len(studies) == 1:
        return str(studies[0].get("state"))
    return None


def analyze_stored(data_dir: Path, out: Path, model_dir: Path | None, timeout_s: float) -> None:
    """Run ``edge-node analyze`` on what the node stored and print the findings.

    No model installed, or none accepting the series (exit status 4), is reported and is not a failure:
    the receiver part of the demo does not depend on a model.
    """
    argv = [*edge_node_command(), "analyze", str(data_dir), "--out", str(out), "--json", "--device", "cpu"]
    if model_dir is not None:
        argv += ["--model-dir", str(model_dir)]
    t0 = time.monotonic()
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DemoError(f"edge-node analyze took longer than {timeout_s:.0f} s") from None
    seconds = time.monotonic() - t0
    try:
        report = json.loads(result.stdout) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    if result.returncode == 4 or (result.returncode == 0 and not report.get("analysed")):
        reasons = "; ".join(str(s.get("reason")) for s in report.get("skipped", [])) or result.stderr.strip()
        say(f"      analysis: nothing analysed ({reasons or 'no model installed'})")
        return
    if result.returncode != 0:
        raise DemoError(f"edge-node analyze exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    for series in report.get("analysed", []):
        findings = series.get("findings", [])
        study = series.get("study_finding") or {}
        say(f"      analysis ({seconds:.1f} s): model {series.get('model', '?')}, {len(findings)} finding(s)"
            + (f", {study.get('name')} score {float(study.get('score') or 0):.2f}" if study else ""))
        say(f"        SEG {series.get('seg_path')}\n        SR  {series.get('sr_path')}")
        for f in findings[:5]:
            say(f"        {f.get('label', '?'):<12} volume {float(f.get('volume_ml') or 0):8.2f} mL  "
                f"diameter {float(f.get('diameter_mm') or 0):6.1f} mm  score {float(f.get('score') or 0):.2f}")
        if len(findings) > 5:
            say(f"        ... and {len(findings) - 5} more (see {out})")


def run_demo(work: Path, slices: int, size: int, timeout_s: float, *, analyze: bool = False,
             model_dir: Path | None = None) -> None:
    """Every step of the demo; raises `DemoError` naming the step that failed."""
    started = time.monotonic()

    def left() -> float:
        return max(1.0, timeout_s - (time.monotonic() - started))

    data_dir = work / "var"
    config = work / "edge-node.toml"
    write_demo_config(config, data_dir)
    say(f"[1/6] config: {config} (copy of config/edge-node.toml; port 0 on 127.0.0.1, data_dir {data_dir}, "
        f"allowed caller {DEMO_AE}, quiet_seconds {QUIET_SECONDS})")

    study = write_demo_study(work / "study", slices, size)
    total_mb = sum(p.stat().st_size for p in study.files) / 1e6
    say(f"[2/6] generated a synthetic CT study: {len(study.files)} slices {size}x{size}, {total_mb:.1f} MB")

    receiver = Receiver(config, work / "edge-node.log")
    try:
        port = receiver.port(min(60.0, left()))
        say(f"[3/6] edge-node serve is listening on 127.0.0.1:{port} (pid {receiver.proc.pid})")

        t0 = time.monotonic()
        acknowledged = send_study(study, port, "EDGE_NODE")
        seconds = time.monotonic() - t0
        say(f"[4/6] sent {len(study.files)} instances by C-STORE as {DEMO_AE}: {acknowledged} acknowledged "
            f"with status 0x0000 in {seconds:.1f} s")
        if acknowledged != len(study.files):
            raise DemoError(f"only {acknowledged} of {len(study.files)} instances were acknowledged")

        snapshot: dict[str, Any] = {}

        def complete() -> bool:
            snapshot.clear()
            snapshot.update(json.loads(receiver.status(as_json=True)))
            state = study_state(snapshot, study.study_instance_uid)
            return snapshot.get("instances") == len(study.files) and state in COMPLETE_STATES

        say(f"      waiting for the index and for completion ({QUIET_SECONDS} s after the last instance) ...")
        try:
            poll("study completion", complete, left(), 0.5, alive=receiver.check_alive)
        except DemoError:
            raise DemoError(
                f"the study did not complete in time; last status: {json.dumps(snapshot)}\n"
                f"receiver log:\n{receiver.log_tail()}"
            ) from None
        state = study_state(snapshot, study.study_instance_uid)
        jobs = ", ".join(f"{k}={v}" for k, v in sorted((snapshot.get("jobs") or {}).items()) if v)
        say(f"[5/6] stored: {snapshot.get('instances')}/{len(study.files)} instances indexed; "
            f"study complete (state {state}); jobs: {jobs or 'none'}")
        say("")
        say(receiver.status(as_json=False).rstrip())
        say("")
        if analyze:
            say("      --analyze: running edge-node analyze on the stored study (CPU) ...")
            analyze_stored(data_dir, work / "results", model_dir, left())
    finally:
        rc = receiver.stop()
    if rc != 0:
        raise DemoError(f"edge-node serve did not stop cleanly on SIGTERM (exit status {rc}); log:\n"
                        f"{receiver.log_tail()}")
    say("[6/6] edge-node serve stopped cleanly on SIGTERM (exit status 0); its key=value log lines for "
        "this study (no patient data):")
    seen: set[str] = set()
    for line in receiver.log.read_text(errors="replace").splitlines():
        event = line[line.find("event="):] if "event=" in line else ""
        if event.split(" ")[0] in ("event=listening", "event=association", "event=study_completed", "event=stopped"):
            if event not in seen:  # serve also prints its listening line on stdout
                seen.add(event)
                say("    " + line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=40, help="slices in the demo study (default 40)")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each slice (default 256)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep config, study, data and log in this folder (default: a temporary folder, removed)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds the whole demo may take (default 120)")
    parser.add_argument("--analyze", action="store_true",
                        help="also run `edge-node analyze` on the stored study and print the findings")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="with --analyze: folder of model bundles (default: the models shipped with the node)")
    args = parser.parse_args(argv)
    if args.slices < 1 or args.size < 16:
        parser.error("--slices must be at least 1 and --size at least 16")

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    if args.data_dir is not None:
        work = args.data_dir.resolve()
        if work.exists() and any(work.iterdir()):
            parser.error(f"--data-dir {work} is not empty; choose a new or empty folder")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="edge-node-demo-"))
    say("edge-node demo: receive a CT study, index it, complete it")
    try:
        run_demo(work, args.slices, args.size, args.timeout, analyze=args.analyze, model_dir=args.model_dir)
    except DemoError as exc:
        say(f"demo FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("demo interrupted; receiver stopped")
        return 1
    finally:
        if args.data_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    say("demo OK" + (f"; files kept in {work}" if args.data_dir is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
