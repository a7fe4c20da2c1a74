"""Pipeline benchmark: per-stage seconds and peak memory of one analysis of a 300-slice 512×512 chest CT.

Generates a synthetic chest CT phantom (`models.phantoms`, 300 slices of 512×512, written as a DICOM
series once into a temporary folder), then runs `pipeline.run.run_job` with the default model in a
fresh child process per run (so the peak RSS is that of one analysis, model load included) and prints
the stage timings (load, model, preprocess, infer, postprocess, encode, write), the end-to-end time and
the peak resident memory, with the goal of the pipeline issue (≤ 15 s end to end, ≤ 2 GB on this
2-core CPU). Usage::

    .venv/bin/python bench/pipeline.py [--runs 3] [--slices 300] [--device auto] [--json bench/out/pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("load", "model", "preprocess", "infer", "postprocess", "encode", "write")
GOAL_SECONDS, GOAL_RSS_MB = 15.0, 2048.0


def _child(series_dir: Path, out_dir: Path, device: str, model_dir: str | None) -> None:
    """Run one analysis and print its timings as JSON (runs in a fresh process)."""
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    from models.registry import ModelRegistry
    from pipeline.run import run_job

    registry = ModelRegistry(Path(model_dir)) if model_dir else ModelRegistry()
    files = sorted(series_dir.glob("*.dcm"))
    t0 = time.perf_counter()
    output = run_job(files, out_dir, registry=registry, device=device)
    total = time.perf_counter() - t0
    timings = {stage: getattr(output.timings, stage) for stage in STAGES}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "timings": timings,
        "end_to_end": total,
        "imports": t0 - started,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "device": output.device,
        "findings": len(output.findings),
        "model": f"{output.model_name} {output.model_version}",
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--seed", type=int, default=4242, help="phantom seed (patient size and lung crop vary)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dir", default=None, help="model directory (default: the shipped models)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "pipeline.json")
    parser.add_argument("--child", nargs=2, metavar=("SERIES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]), args.device, args.model_dir)
        return 0

    sys.path.insert(0, str(ROOT))
    from models.phantoms import generate_phantom, write_phantom_series

    work = Path(tempfile.mkdtemp(prefix="edge-node-bench-pipeline-"))
    try:
        t = time.perf_counter()
        phantom = generate_phantom(args.seed, shape_zyx=(args.slices, args.matrix, args.matrix), nodules=3,
                                   nodule_diameter_mm=(6.0, 20.0))
        series = work / "series"
        write_phantom_series(phantom, series)
        size_mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        print(f"generated {args.slices}x{args.matrix}x{args.matrix} chest CT phantom ({size_mb:.0f} MB, "
              f"{len(phantom.nodules)} nodules) in {time.perf_counter() - t:.1f} s")
        runs = []
        for i in range(args.runs):
            out = work / f"out{i}"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(series), str(out), "--device", args.device]
                + (["--model-dir", args.model_dir] if args.model_dir else []),
                capture_output=True, text=True, check=False, cwd=ROOT,
            )
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)
        print(f"\nmodel {runs[0]['model']} on {runs[0]['device']}; {args.runs} runs, median "
              f"(host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f})")
        print(f"{'stage':<14}{'seconds':>10}")
        median = {s: statistics.median(r["timings"][s] for r in runs) for s in STAGES}
        for stage in STAGES:
            print(f"{stage:<14}{median[stage]:>10.2f}")
        end_to_end = statistics.median(r["end_to_end"] for r in runs)
        rss = max(r["peak_rss_mb"] for r in runs)
        print(f"{'end to end':<14}{end_to_end:>10.2f}   (goal ≤ {GOAL_SECONDS:.0f} s: "
              f"{'met' if end_to_end <= GOAL_SECONDS else 'NOT met'})")
        print(f"{'peak RSS MB':<14}{rss:>10.0f}   (goal ≤ {GOAL_RSS_MB:.0f} MB: "
              f"{'met' if rss <= GOAL_RSS_MB else 'NOT met'})")
        # What an admin types: the whole `edge-node analyze` command (start-up, imports, reading the
        # files, analysis, writing SEG and SR), wall time.
        cli = Path(sys.executable).with_name("edge-node")
        command = [str(cli)] if cli.exists() else [sys.executable, "-m", "node.cli"]
        walls, inside = [], []
        for i in range(args.runs):
            out = work / f"cli{i}"
            t = time.perf_counter()
            proc = subprocess.run([*command, "analyze", str(series), "--out", str(out), "--device", args.device,
                                   "--json"] + (["--model-dir", args.model_dir] if args.model_dir else []),
                                  capture_output=True, text=True, check=False, cwd=ROOT)
            walls.append(time.perf_counter() - t)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            # The command's own stage timings: the rest of its wall time is start-up, imports and
            # grouping the files into series.
            (job,) = json.loads(proc.stdout)["analysed"]
            inside.append(sum(job["timings_s"].values()))
            shutil.rmtree(out, ignore_errors=True)
        cli_wall = statistics.median(walls)
        print(f"{'edge-node analyze':<14}{cli_wall:>7.2f}   (whole command, wall; goal ≤ {GOAL_SECONDS:.0f} s: "
              f"{'met' if cli_wall <= GOAL_SECONDS else 'NOT met'})")
        print(f"{'':<14}runs: " + ", ".join(f"{w:.2f} s (analysis {a:.2f} + start-up {w - a:.2f})"
                                           for w, a in zip(walls, inside, strict=True)))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "median": median, "end_to_end": end_to_end,
                                         "peak_rss_mb": rss, "analyze_command_seconds": cli_wall,
                                         "analyze_command_runs": [{"wall": w, "analysis": a} for w, a in
                                                                  zip(walls, inside, strict=True)],
                                         "seed": args.seed, "slices": args.slices,
                                         "matrix": args.matrix}, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
