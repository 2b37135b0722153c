"""The API under load, on the embedded model: 50 concurrent streaming clients (the real `openai` client), served
with continuous batching (the default) and one generation at a time (`--batch-size 1`), in one run.

For each server it prints completions/s, p50/p95 latency and time to first token of the concurrent clients, and
one client's tokens/s alone (sequential requests); then the batched/one-at-a-time ratios.

    python benchmarks/api_load.py [--clients 50] [--max-tokens 16] [--single 3] [--temperature 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


async def load(url: str, clients: int, max_tokens: int, single: int, temperature: float) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    await one_stream(client, model, "Warm up.", 4)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, model, f"Tell me one fact about {TOPICS[i % len(TOPICS)]} "
                                                f"(question {i}).", max_tokens, temperature)
                                     for i in range(clients)))
    wall = time.perf_counter() - start
    unfinished = sum(r["finish"] is None for r in results)
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
            "unfinished": unfinished, "single tok/s": tokens / alone}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--single", type=int, default=3, help="sequential 64-token requests of one client alone")
    parser.add_argument("--batch-size", type=int, default=64, help="the batched server's --batch-size")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers; > 0: sampled")
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
            figures[name] = asyncio.run(load(url, args.clients, args.max_tokens, args.single, args.temperature))
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(f"  {name:14s} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in figures[name].items()), flush=True)
    fast, slow = figures["batched"], figures["one at a time"]
    print(f"batched / one at a time: completions/s x{fast['completions/s'] / slow['completions/s']:.2f}, "
          f"p95 latency x{fast['p95 s'] / slow['p95 s']:.2f}, single-client tok/s "
          f"x{fast['single tok/s'] / slow['single tok/s']:.2f}")
    return 0 if fast["unfinished"] == slow["unfinished"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
