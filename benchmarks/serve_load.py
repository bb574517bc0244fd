"""Load generator for ``bagel-rt serve``: N text-to-image requests at concurrency C, latency and throughput.

Against a running server:

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 200 --concurrency 16 --size 64 --steps 2

Or starting the server itself, once per ``--max-batch`` value (batching across requests on and off), and
measuring every concurrency against it — the H200 measurement in one command:

    python benchmarks/serve_load.py --start --random-weights 7b --max-batch 8,1 --concurrency 1,4,16 \\
        --requests 32 --size 1024 --steps 50 --out benchmarks/results/serve.jsonl

Each request asks for one image with its own seed (request i: seed i) and checks that the answer carries that
seed, so a lost, duplicated or mixed-up answer is counted as an error. A 429 is counted, not retried. Prints a
table (p50/p99 latency of the successful requests, requests/s and images/s, 429s, errors) and appends one JSON
line per (max_batch, concurrency) to ``--out`` with the GPU, versions, commit, date and command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

PROMPTS = ("A red bagel on a white plate, studio light.", "A lighthouse at dawn over a calm sea.",
           "Two dogs play in the park.", "A watercolor map of an imaginary island with a small harbor.")


def generation_body(i: int, size: int, steps: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "size": f"{size}x{size}", "seed": i, "num_timesteps": steps}


async def run_load(url: str, requests: int, concurrency: int, body=generation_body, size: int = 64,
                   steps: int = 2, timeout_s: float = 3600.0) -> dict:
    """Send ``requests`` generations from ``concurrency`` workers; returns the outcomes and wall seconds.

    outcomes: one per request index: (status, seconds, retry_after header or None, problem or None), where a
    problem is an answer that is not the request's own (wrong seed or image count) or a transport error.
    """
    outcomes: dict[int, tuple] = {}
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker():
            for i in next_index:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/images/generations", json=body(i, size, steps))
                except httpx.HTTPError as e:
                    outcomes[i] = (None, time.perf_counter() - t0, None, f"{type(e).__name__}: {e}")
                    continue
                dt = time.perf_counter() - t0
                problem = None
                if r.status_code == 200:
                    seeds = [d.get("seed") for d in r.json().get("data", [])]
                    if seeds != [i]:
                        problem = f"request {i} got the images of seeds {seeds}"
                elif r.status_code != 429 or "error" not in r.json():
                    problem = f"HTTP {r.status_code}: {r.text[:200]}"
                outcomes[i] = (r.status_code, dt, r.headers.get("retry-after"), problem)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return {"outcomes": outcomes, "seconds": seconds}


def summarize(run: dict, requests: int) -> dict:
    """p50/p99/mean latency of the successes, throughput, status counts and problems of a :func:`run_load`."""
    out = run["outcomes"]
    ok = [dt for status, dt, _, problem in out.values() if status == 200 and problem is None]
    statuses = Counter(str(status) for status, *_ in out.values())
    problems = [p for *_, p in out.values() if p is not None]
    pct = (lambda q: round(float(np.percentile(ok, q)), 4)) if ok else (lambda q: None)
    return {"requests": requests, "answered": len(out), "ok": len(ok), "n429": statuses.get("429", 0),
            "errors": len(problems) + requests - len(out), "statuses": dict(statuses),
            "p50_s": pct(50), "p99_s": pct(99), "mean_s": round(float(np.mean(ok)), 4) if ok else None,
            "seconds": round(run["seconds"], 3), "requests_per_s": round(len(ok) / run["seconds"], 3),
            "problems": problems[:5]}


# -- starting a server --------------------------------------------------------------------------------------------
def gpu_peak_gib(url: str) -> float | None:
    """The server's peak allocated GPU memory from its /metrics (None on a CPU server)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(r'^bagel_gpu_memory_bytes\{kind="peak_allocated"\} ([0-9.e+]+)$', text, re.M)
    return round(float(m[1]) / 2**30, 2) if m else None


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    """``bagel-rt serve`` in a subprocess on a free port; returns (process, base URL) once /health answers."""
    cmd = [sys.executable, "-m", "bagel_rt.cli.entry", "serve", "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", str(args.max_queue), "--log-level", "warning"]
    cmd += ["--model", args.model] if args.model else ["--random-weights", args.random_weights]
    cmd += args.server_args
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:  # the server prints its address once it is about to listen
        sys.stderr.write(line)
        if m := re.search(r"serving .* on (http://\S+)", line):
            url = m[1]
            break
    if url is None:
        raise SystemExit(f"the server did not start (exit code {proc.wait()})")
    # keep its log flowing (a full pipe would block the server)
    threading.Thread(target=lambda: [sys.stderr.write(line) for line in proc.stderr], daemon=True).start()
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer /health")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def emit(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (else --start)")
    ap.add_argument("--start", action="store_true", help="start `bagel-rt serve` for each --max-batch value")
    ap.add_argument("--model", help="with --start: the checkpoint to serve")
    ap.add_argument("--random-weights", choices=["7b", "tiny"], default="7b", help="with --start, without --model")
    ap.add_argument("--max-batch", default="8,1", help="with --start: comma-separated values (1: batching off)")
    ap.add_argument("--max-queue", type=int, default=1024, help="with --start: the server's queue")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                    help="with --start: more `bagel-rt serve` options (last on the command line)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", default="16", help="comma-separated")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of `concurrency` requests first")
    ap.add_argument("--out", default=None, help="append the JSON lines here")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    if bool(args.url) == args.start:
        ap.error("give either --url or --start")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bagel_rt.bench import environment

    env = environment(args.commit)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    configs = [int(b) for b in args.max_batch.split(",")] if args.start else [None]
    rows = []
    for max_batch in configs:
        proc, url = start_server(args, max_batch) if args.start else (None, args.url)
        try:
            for c in concurrencies:
                for _ in range(args.warmup):  # new batch shapes capture new CUDA graphs: not in the timing
                    asyncio.run(run_load(url, c, c, size=args.size, steps=args.steps))
                s = summarize(asyncio.run(run_load(url, args.requests, c, size=args.size, steps=args.steps)),
                              args.requests)
                row = {"bench": "serve_load", "url": url, "max_batch": max_batch, "concurrency": c,
                       "size": args.size, "steps": args.steps,
                       "images_per_s": s["requests_per_s"], "gpu_peak_gib": gpu_peak_gib(url), **s, **env,
                       "model": args.model or (f"random-{args.random_weights}" if args.start else None),
                       "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
                emit(row, args.out)
                rows.append(row)
        finally:
            if proc is not None:
                stop_server(proc)
    print(f"\n{'max_batch':>9} {'conc':>5} {'p50 s':>8} {'p99 s':>8} {'req/s':>8} {'429':>5} {'errors':>6}")
    for r in rows:
        print(f"{str(r['max_batch']):>9} {r['concurrency']:>5} {r['p50_s']!s:>8} {r['p99_s']!s:>8} "
              f"{r['requests_per_s']:>8} {r['n429']:>5} {r['errors']:>6}")


if __name__ == "__main__":
    main()
