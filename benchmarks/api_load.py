"""The API under load, on the embedded model: 50 concurrent streaming clients (the real `openai` client), served
with continuous batching (the default) and one generation at a time (`--batch-size 1`), in one run.

Among the good clients, bad requests are interleaved (--bad, default 10 per server): a prompt longer than the
model's context, `max_tokens: 1000000000`, `"stream": "yes"`, an unknown role, `n: 0`. Each must get a 4xx at once;
every good stream must complete; no request may get a 5xx or hang. At the end the server gets SIGTERM while a long
answer is streaming, and must exit within 5 s.

For each server it prints completions/s, p50/p95 latency and time to first token of the concurrent clients, one
client's tokens/s alone (sequential requests), the bad requests' statuses, server errors, hung requests and the
seconds from SIGTERM to exit; then the batched/one-at-a-time ratios. Exit status 1 when any check fails.

    python benchmarks/api_load.py [--clients 50] [--max-tokens 16] [--single 3] [--temperature 0] [--bad 10]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HANG = 300  # seconds after which a request counts as hung
TOPICS = ["cats", "rivers", "tea", "bridges", "winter", "music", "gardens", "the moon", "trains", "chess"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(batch_size: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`tuneforge api` on the embedded model; returns once /v1/models answers."""
    port = free_port()
    command = [sys.executable, "-m", "tuneforge", "api", "--port", str(port), "--batch-size", str(batch_size)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}); see {log}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not answer within 300 s; see {log}")


async def one_stream(client, model: str, question: str, max_tokens: int, temperature: float = 0.0) -> dict:
    """One streamed completion: latency, time to first content, chunks received."""
    start = time.perf_counter()
    first = None
    pieces = 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, temperature=temperature, stream=True,
                                                  stream_options={"include_usage": True})
    finish = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    end = time.perf_counter()
    return {"latency": end - start, "first": (first or end) - start, "finish": finish, "pieces": pieces}


def bad_bodies(model: str) -> list[dict]:
    """Requests a server must refuse at once with a 4xx."""
    hi = [{"role": "user", "content": "hi"}]
    return [{"model": model, "messages": [{"role": "user", "content": "word " * 20000}], "stream": True},
            {"model": model, "messages": hi, "max_tokens": 1_000_000_000, "stream": True},
            {"model": model, "messages": hi, "stream": "yes"},
            {"model": model, "messages": [{"role": "wizard", "content": "hi"}]},
            {"model": model, "messages": hi, "n": 0}]


async def one_bad(url: str, body: dict) -> int:
    """The status of one bad request (raw HTTP: the openai client would refuse to send some of them)."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{url}/chat/completions", json=body)
        return response.status_code


async def load(url: str, clients: int, max_tokens: int, single: int, temperature: float, bad: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    await one_stream(client, model, "Warm up.", 4)
    start = time.perf_counter()
    good = [one_stream(client, model, f"Tell me one fact about {TOPICS[i % len(TOPICS)]} (question {i}).",
                       max_tokens, temperature) for i in range(clients)]
    bodies = bad_bodies(model)
    wrong = [one_bad(url, bodies[i % len(bodies)]) for i in range(bad)]
    done = await asyncio.gather(*(asyncio.wait_for(c, HANG) for c in (*good, *wrong)), return_exceptions=True)
    wall = time.perf_counter() - start
    results = [r for r in done[:clients] if isinstance(r, dict)]
    statuses = [r for r in done[clients:] if isinstance(r, int)]
    hung = sum(isinstance(r, TimeoutError) for r in done)
    errors = [r for r in done if isinstance(r, BaseException) and not isinstance(r, TimeoutError)]
    unfinished = clients - sum(r["finish"] is not None for r in results)
    latencies = sorted(r["latency"] for r in results)
    firsts = sorted(r["first"] for r in results)
    tokens = 0
    alone = time.perf_counter()
    for i in range(single):  # one client alone, sequential requests
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Write a short story about {TOPICS[i]}."}],
            max_tokens=64, temperature=temperature)
        tokens += reply.usage.completion_tokens
    alone = time.perf_counter() - alone
    await client.close()
    return {"completions/s": clients / wall, "wall s": wall, "p50 s": percentile(latencies, 50),
            "p95 s": percentile(latencies, 95), "first token p50 s": percentile(firsts, 50),
            "unfinished": unfinished, "single tok/s": tokens / alone,
            "bad 4xx": sum(400 <= s < 500 for s in statuses), "bad": bad, "hung": hung,
            "server errors": sum(s >= 500 for s in statuses) + len(errors)}


def sigterm_seconds(process: subprocess.Popen, url: str) -> float:
    """Seconds from SIGTERM to exit while a long answer streams."""
    import threading

    import httpx

    def long_answer() -> None:
        body = {"model": "x", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 1500,
                "stream": True}
        try:
            models = httpx.get(f"{url}/models", timeout=10).json()["data"]
            body["model"] = models[0]["id"]
            with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as response:
                for _ in response.iter_lines():
                    pass
        except httpx.HTTPError:
            pass

    threading.Thread(target=long_answer, daemon=True).start()
    time.sleep(2.0)
    start = time.perf_counter()
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return math.inf
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--single", type=int, default=3, help="sequential 64-token requests of one client alone")
    parser.add_argument("--batch-size", type=int, default=64, help="the batched server's --batch-size")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers; > 0: sampled")
    parser.add_argument("--bad", type=int, default=10, help="bad requests interleaved with the good clients")
    args = parser.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "tuneforge-api-load"
    work.mkdir(parents=True, exist_ok=True)
    kind = "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature:g})"
    print(f"{args.clients} concurrent streaming clients, {args.max_tokens}-token {kind} answers, embedded model; "
          f"then one client alone ({args.single} x 64 tokens)", flush=True)
    figures: dict[str, dict] = {}
    for name, batch in (("batched", args.batch_size), ("one at a time", 1)):
        process, url = start_server(batch, work / f"server-{batch}.log")
        try:
            figures[name] = asyncio.run(load(url, args.clients, args.max_tokens, args.single, args.temperature,
                                             args.bad))
            figures[name]["SIGTERM to exit s"] = sigterm_seconds(process, url)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
        print(f"  {name:14s} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in figures[name].items()), flush=True)
    fast, slow = figures["batched"], figures["one at a time"]
    print(f"batched / one at a time: completions/s x{fast['completions/s'] / slow['completions/s']:.2f}, "
          f"p95 latency x{fast['p95 s'] / slow['p95 s']:.2f}, single-client tok/s "
          f"x{fast['single tok/s'] / slow['single tok/s']:.2f}")
    failed = [f"{name}: {problem}" for name, got in figures.items() for problem, bad in (
        ("good streams unfinished", got["unfinished"]), ("server errors", got["server errors"]),
        ("hung requests", got["hung"]),
        ("bad requests without a 4xx", got["bad"] - got["bad 4xx"]),
        ("slower than 5 s to stop after SIGTERM", got["SIGTERM to exit s"] > 5)) if bad]
    print("checks: " + ("all passed" if not failed else "FAILED: " + "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
