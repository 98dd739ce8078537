"""`instructlm serve` under load: throughput and latency with many clients, on loopback.

    .venv/bin/python benchmarks/serve_load.py RUN [--requests 32] [--clients 1,8,32]
                                                  [--disconnects 100] [--max-tokens 64]
                                                  [--file FILE]
    .venv/bin/python benchmarks/serve_load.py RUN --mixed
    .venv/bin/python benchmarks/serve_load.py --burst 64 RUN -- --max-queue 4

Starts `instructlm serve RUN` (extra flags after `--`), then sends the same `--requests`
greedy chat requests (streamed, so that the first token's time is seen) with 1, 8, ...
clients at once, in one server run: requests per second, generated tokens per second, p50
and p95 of the time to the first token and of the whole answer, and whether every answer
equals the one-client answer. Then `--disconnects` requests that hang up mid-stream, and one
more request that must still be answered. The server's resident memory is read before,
after and at its peak. A table, then one line of JSON. Bounded: every request has a
timeout, and the whole run `--timeout` seconds.

`--mixed` measures memory instead: one long prompt (about 1,800 tokens) asked alone, then
in a fresh server the long prompt among 31 short ones, then among 47: the server's peak and
its idle memory before and after each, beside the long prompt's peak alone. `--burst N`
sends N requests at once and counts how many were answered and how many refused.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run (or a base model) to serve")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", default="1,8,32", help="clients at once, comma-separated; "
                                                            "the first is the reference")
    parser.add_argument("--disconnects", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--file", help="instructions to ask (default: the run's own file, "
                                       "else examples/spells.txt)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for everything")
    parser.add_argument("--mixed", action="store_true",
                        help="memory with one long prompt among short ones (see above)")
    parser.add_argument("--burst", type=int, help="N requests at once: how many get in")
    parser.add_argument("flags", nargs="*", help="after --: flags for `instructlm serve`")
    args = parser.parse_args()
    if args.burst:
        counts = burst(args.run, args.flags, args.burst, args.max_tokens, args.timeout)
        print(f"{args.burst} requests at once (serve {' '.join(args.flags)}): {counts}")
        print(json.dumps(counts))
        return
    if args.mixed:
        mixed = mixed_memory(args.run, args.flags, args.max_tokens, args.timeout, args.file)
        print_mixed(mixed)
        print(json.dumps(mixed))
        return
    results = load_test(args.run, args.requests, [int(c) for c in args.clients.split(",")],
                        args.disconnects, args.max_tokens, args.timeout, args.flags, args.file)
    print_table(results)
    print(json.dumps(results))


def instructions(run: str, n: int, file: str | None = None) -> list[str]:
    """`n` instructions from `file`, else the run's own file, else examples/spells.txt
    (held-out ones first), repeated as needed."""
    from instructlm.data.formats import read_instruction_file

    info = Path(run) / "instructlm.json"
    if file is None:
        file = json.loads(info.read_text())["data"]["file"] if info.exists() \
            else str(ROOT / "examples" / "spells.txt")
    data = read_instruction_file(file)
    pool = [ex.instruction for ex in data.eval + data.train]
    return [pool[i % len(pool)] for i in range(n)]


class Server:
    """`instructlm serve` in a child process, on a free loopback port."""

    def __init__(self, run: str, flags: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "instructlm", "serve", run, "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()
        found = re.search(r"OpenAI's API at (http://\S+)/v1", banner)
        if not found:
            self.process.kill()
            raise SystemExit(f"the server did not start: {banner!r}")
        address = urlparse(found.group(1))
        self.host, self.port = address.hostname, address.port

    def memory_mb(self) -> dict[str, float]:
        """Resident memory now and at its peak (Linux)."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)
        return {"rss_mb": fields.get("VmRSS", 0.0), "peak_rss_mb": fields.get("VmHWM", 0.0)}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def ask(server: Server, instruction: str, max_tokens: int, deadline: float,
        hang_up: bool = False) -> dict[str, Any]:
    """One streamed greedy chat request: its text, status, and timings. With `hang_up`,
    the client goes away after the first event."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(server.host, server.port,
                                            timeout=max(1.0, deadline - time.monotonic()))
    body = {"messages": [{"role": "user", "content": instruction}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}}
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"status": response.status, "text": None}
        text, first, tokens = "", None, 0
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text += choice["delta"]["content"]
            if hang_up and first:
                break
        return {"status": 200, "text": text, "tokens": tokens,
                "first_s": (first or time.perf_counter()) - started,
                "total_s": time.perf_counter() - started}
    finally:
        connection.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)


def load_test(run: str, n: int, clients: list[int], disconnects: int, max_tokens: int,
              timeout: float, flags: list[str], file: str | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    asked = instructions(run, n, file)
    server = Server(run, flags)
    try:
        results: dict[str, Any] = {"run": run, "requests": n, "max_tokens": max_tokens,
                                   "flags": flags, "memory_start": server.memory_mb()}
        ask(server, asked[0], max_tokens, deadline)  # warm-up
        reference: list[str | None] = []
        for count in clients:
            started = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                answers = list(pool.map(lambda q: ask(server, q, max_tokens, deadline), asked))
            seconds = time.perf_counter() - started
            texts = [a["text"] for a in answers]
            reference = reference or texts
            done = [a for a in answers if a["status"] == 200]
            results[f"clients_{count}"] = {
                "seconds": round(seconds, 2),
                "requests_per_s": round(n / seconds, 3),
                "tokens_per_s": round(sum(a["tokens"] for a in done) / seconds, 1),
                "first_token_p50_s": percentile([a["first_s"] for a in done], 0.5),
                "first_token_p95_s": percentile([a["first_s"] for a in done], 0.95),
                "latency_p50_s": percentile([a["total_s"] for a in done], 0.5),
                "latency_p95_s": percentile([a["total_s"] for a in done], 0.95),
                "statuses": sorted({a["status"] for a in answers}),
                "same_answers": sum(a == b for a, b in zip(texts, reference, strict=True)),
            }
        base = results[f"clients_{clients[0]}"]["requests_per_s"]
        for count in clients[1:]:
            results[f"clients_{count}"]["speedup"] = round(
                results[f"clients_{count}"]["requests_per_s"] / base, 2)
        results["memory_loaded"] = server.memory_mb()
        with ThreadPoolExecutor(8) as pool:
            gone = list(pool.map(lambda i: ask(server, asked[i % n], max_tokens, deadline,
                                               hang_up=True), range(disconnects)))
        after = ask(server, asked[0], max_tokens, deadline)
        results["disconnects"] = {"count": disconnects,
                                  "statuses": sorted({g["status"] for g in gone}),
                                  "then_answered": after["status"] == 200 and
                                  after["text"] == reference[0]}
        results["memory_end"] = server.memory_mb()
        return results
    finally:
        server.stop()


LONG_SENTENCE, LONG_REPEATS = "Tell me a spell about cheese. ", 260  # about 1,800 tokens


def settled_mb(server: Server, settle_s: float) -> float:
    """Resident memory once the server has been idle for `settle_s`."""
    time.sleep(settle_s)
    return server.memory_mb()["rss_mb"]


def mixed_memory(run: str, flags: list[str], max_tokens: int, timeout: float,
                 file: str | None = None, repeats: int = LONG_REPEATS, settle_s: float = 2.0
                 ) -> dict[str, Any]:
    """The long prompt alone, then among short ones: peaks, and idle before and after."""
    deadline = time.monotonic() + timeout
    short, long = instructions(run, 47, file), LONG_SENTENCE * repeats
    results: dict[str, Any] = {"run": run, "max_tokens": max_tokens, "flags": flags}
    for name, rounds in (("alone", [[long]]), ("mixed", [[long, *short[:31]], [long, *short]])):
        server = Server(run, flags)
        try:
            ask(server, short[0], max_tokens, deadline)  # warm-up
            results[name] = {"idle_before_mb": settled_mb(server, settle_s), "rounds": []}
            for asked in rounds:
                with ThreadPoolExecutor(len(asked)) as pool:
                    answers = list(pool.map(lambda q: ask(server, q, max_tokens, deadline),
                                            asked))
                results[name]["rounds"].append({
                    "clients": len(asked), "statuses": sorted({a["status"] for a in answers}),
                    "peak_mb": server.memory_mb()["peak_rss_mb"],
                    "idle_after_mb": settled_mb(server, settle_s)})
        finally:
            server.stop()
    alone = results["alone"]["rounds"][0]["peak_mb"]
    idle = results["mixed"]["idle_before_mb"]
    results["peak_over_alone"] = round(max(r["peak_mb"] for r in results["mixed"]["rounds"])
                                       / alone, 2)
    results["idle_after_over_before"] = round(
        max(r["idle_after_mb"] for r in results["mixed"]["rounds"]) / idle, 3)
    return results


def burst(run: str, flags: list[str], n: int, max_tokens: int, timeout: float
          ) -> dict[str, int]:
    """`n` requests sent at once to a fresh server: how many of each status came back."""
    deadline = time.monotonic() + timeout
    asked = instructions(run, n)
    server = Server(run, flags)
    try:
        ask(server, asked[0], max_tokens, deadline)  # warm-up
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda q: ask(server, q, max_tokens, deadline), asked))
    finally:
        server.stop()
    statuses = [a["status"] for a in answers]
    return {str(status): statuses.count(status) for status in sorted(set(statuses))}


def print_mixed(r: dict[str, Any]) -> None:
    print(f"{r['run']}: one prompt of about 1,800 tokens, alone and among short ones "
          f"(at most {r['max_tokens']} tokens an answer)")
    print()
    print("| workload | clients | statuses | idle before MB | peak MB | idle after MB |")
    print("|---|---|---|---|---|---|")
    for name in ("alone", "mixed"):
        idle = r[name]["idle_before_mb"]
        for x in r[name]["rounds"]:
            print(f"| {name} | {x['clients']} | {x['statuses']} | {idle} | {x['peak_mb']} | "
                  f"{x['idle_after_mb']} |")
            idle = x["idle_after_mb"]
    print()
    print(f"peak among short ones / peak alone: {r['peak_over_alone']}x; idle after / idle "
          f"before: {r['idle_after_over_before']}")


def print_table(r: dict[str, Any]) -> None:
    print(f"{r['run']}: {r['requests']} greedy chat requests (streamed, at most "
          f"{r['max_tokens']} tokens each), the same in every row")
    print()
    print("| clients at once | s | requests/s | tokens/s | speed-up | first token p50 / p95 s "
          "| whole answer p50 / p95 s | same answers | statuses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, x in r.items():
        if not key.startswith("clients_"):
            continue
        print(f"| {key[8:]} | {x['seconds']} | {x['requests_per_s']} | {x['tokens_per_s']} | "
              f"{x.get('speedup', 1.0)}x | {x['first_token_p50_s']} / {x['first_token_p95_s']} "
              f"| {x['latency_p50_s']} / {x['latency_p95_s']} | {x['same_answers']}/"
              f"{r['requests']} | {x['statuses']} |")
    d = r["disconnects"]
    print()
    print(f"{d['count']} clients hung up mid-stream (statuses {d['statuses']}); the next "
          f"request was {'answered as before' if d['then_answered'] else 'NOT answered'}.")
    print(f"server memory: {r['memory_start']['rss_mb']} MB at the start, "
          f"{r['memory_loaded']['rss_mb']} MB after the load, {r['memory_end']['rss_mb']} MB "
          f"after the disconnects; peak {r['memory_end']['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
