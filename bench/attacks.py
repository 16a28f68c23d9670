"""Requests built to exhaust the service, and what other clients see meanwhile (loopback only).

Run through the soak harness, which starts the server:

    python bench/soak.py --tiny --attacks --out attacks.json
    python bench/soak.py --attacks --attack-s 20          # the shipped checkpoint

Each kind runs for a bounded time (--attack-s) beside a steady victim load (two clients posting
real photos to /score, one request at a time each). Before the first kind the victims run alone
for as long: the baseline. Per kind: what the attacker got (status counts, how long the answers
took, or how the server ended the connection), the victims' p50/p99 latency and errors during
the attack, and the server's resident memory (before, peak, after). All traffic goes to the one
127.0.0.1 server; every kind is bounded in connections, bytes and time.

Kinds (KINDS):
  tiny_parts    /score/batch with many 1-byte file parts (the batch limit, and 10x, 300x it)
  many_fields   /score with thousands of empty text fields
  big_fields    /score/batch with text fields of 1 MiB each (what a parser keeps in memory)
  part_headers  one multipart part with 200 headers, and one with a 64 KiB header
  big_head      a request head (one header) of 1 MiB
  slowloris     many connections, each sending its request head one byte at a time
"""
from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

from multipart_bodies import BOUNDARY, file_part, multipart, text_part

KINDS = ("tiny_parts", "many_fields", "big_fields", "part_headers", "big_head", "slowloris")


def post_head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary="
            f"{BOUNDARY}\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


async def exchange(port: int, request: bytes, *, timeout: float, chunk: int = 1 << 16) -> dict:
    """Send a raw request (body included), read the answer's status line; how long it took."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return {"outcome": f"connect failed: {type(exc).__name__}", "seconds": time.perf_counter() - started}
    try:
        async def send():
            try:
                for i in range(0, len(request), chunk):
                    writer.write(request[i:i + chunk])
                    await writer.drain()
            except ConnectionError:
                pass  # the server answered and closed before the whole request went out

        sender = asyncio.ensure_future(send())
        line = await asyncio.wait_for(reader.readline(), timeout)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)).decode("latin-1").lower()
        sender.cancel()
        status = line.decode("latin-1").split(" ")[1] if line else "closed"
        kind = "json" if "application/json" in head else "other"
        return {"outcome": f"{status} {kind}", "seconds": time.perf_counter() - started}
    except asyncio.TimeoutError:
        return {"outcome": "no answer (client timeout)", "seconds": time.perf_counter() - started}
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        return {"outcome": f"closed: {type(exc).__name__}", "seconds": time.perf_counter() - started}
    finally:
        writer.close()


async def repeat(port: int, requests: list[bytes], seconds: float, timeout: float) -> list[dict]:
    """Send the requests one after another, round robin, until `seconds` have passed."""
    results, stop, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < stop:
        results.append(await exchange(port, requests[i % len(requests)], timeout=timeout))
        i += 1
    return results


async def slowloris(port: int, seconds: float, *, connections: int, interval: float) -> list[dict]:
    """`connections` connections, each sending a valid request head one byte every `interval` s
    (a new connection when the server closes one), until `seconds` have passed."""
    head = post_head("/score", 10, "X-Padding: " + "a" * 4000 + "\r\n")
    stop = time.perf_counter() + seconds
    results = []

    async def one():
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                results.append({"outcome": f"connect failed: {type(exc).__name__}", "seconds": 0.0})
                await asyncio.sleep(interval)
                continue
            outcome = "held to the end"
            try:
                for byte in head:
                    if time.perf_counter() >= stop:
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    try:
                        line = await asyncio.wait_for(reader.readline(), interval)
                    except asyncio.TimeoutError:
                        continue
                    outcome = f"{line.decode('latin-1').split(' ')[1]} answered" if line else "closed by the server"
                    break
            except ConnectionError:
                outcome = "closed by the server"
            finally:
                writer.close()
            results.append({"outcome": outcome, "seconds": time.perf_counter() - started})

    await asyncio.gather(*(one() for _ in range(connections)))
    return results


async def victims(url: str, payloads, seconds: float, clients: int = 2) -> dict:
    """Closed-loop /score clients with real photos, each in a thread of its own (so that the
    attacker's event loop does not delay them): latencies of the 200s, and anything else."""
    import httpx

    latencies, other = [], Counter()
    stop = time.perf_counter() + seconds

    def loop(k):
        i = k
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.perf_counter() < stop:
                name, data = payloads[i % len(payloads)][:2]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = client.post("/score", files={"file": (name, data, "image/jpeg")})
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        other[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    other[type(exc).__name__] += 1

    await asyncio.gather(*(asyncio.to_thread(loop, k) for k in range(clients)))
    return {"requests": len(latencies) + sum(other.values()), "p50_ms": _ms(latencies, 0.5),
            "p99_ms": _ms(latencies, 0.99), "errors": dict(other)}


def _ms(values, q) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def kind_requests(kind: str, good: bytes, batch_limit: int) -> list[bytes]:
    if kind == "tiny_parts":
        bodies = [multipart([file_part("files", i, b"x") for i in range(n)])
                  for n in (batch_limit + 8, 10 * batch_limit, 300 * batch_limit)]
        return [post_head("/score/batch", len(b)) + b for b in bodies]
    if kind == "many_fields":
        bodies = [multipart([file_part("file", 0, good)] + [text_part(f"f{i}") for i in range(n)]) for n in (2000, 20000)]
        return [post_head("/score", len(b)) + b for b in bodies]
    if kind == "big_fields":
        body = multipart([file_part("files", 0, good)] + [text_part(f"f{i}", b"v" * (1 << 20)) for i in range(64)])
        return [post_head("/score/batch", len(body)) + body]
    if kind == "part_headers":
        disposition = 'Content-Disposition: form-data; name="file"; filename="a.jpg"'
        many = disposition + "".join(f"\r\nX-H{i}: v" for i in range(200)) + "\r\nContent-Type: image/jpeg"
        long = disposition + "\r\nX-Long: " + "a" * 65536
        return [post_head("/score", len(b)) + b for b in (multipart([(many, good)]), multipart([(long, good)]))]
    if kind == "big_head":
        return [post_head("/score", 4, "X-Big: " + "a" * (1 << 20) + "\r\n") + b"abcd"]
    raise ValueError(kind)


def rss_sampler(pid: int, rss_mib):
    """A task that samples the server's RSS every 0.2 s into a list, and the list."""
    samples: list[float] = []

    async def sample():
        while True:
            samples.append(rss_mib(pid))
            await asyncio.sleep(0.2)

    return sample, samples


async def run(url: str, pid: int, payloads, *, rss_mib, seconds: float, batch_limit: int, kinds=KINDS,
              slowloris_connections: int = 300, timeout: float = 30.0) -> dict:
    """The baseline, then every kind beside the victims; the report."""
    port = int(url.rsplit(":", 1)[1])
    good = payloads[0][1]
    report = {"seconds_per_kind": seconds, "victims": "2 closed-loop /score clients", "kinds": {}}
    sample, samples = rss_sampler(pid, rss_mib)
    sampler = asyncio.ensure_future(sample())
    try:
        base_rss = rss_mib(pid)
        report["baseline"] = {**await victims(url, payloads, seconds), "rss_mib": round(base_rss, 1)}
        for kind in kinds:
            samples.clear()
            before = rss_mib(pid)
            if kind == "slowloris":
                attack = slowloris(port, seconds, connections=slowloris_connections, interval=1.0)
            else:
                attack = repeat(port, kind_requests(kind, good, batch_limit), seconds, timeout)
            victim, answers = await asyncio.gather(victims(url, payloads, seconds), attack)
            await asyncio.sleep(1.0)  # let the server settle before "after"
            report["kinds"][kind] = {
                "attacker": _summarise(answers), "victims": victim,
                "rss_mib": {"before": round(before, 1), "peak": round(max(samples or [before]), 1),
                            "after": round(rss_mib(pid), 1)}}
    finally:
        sampler.cancel()
    return report


def _summarise(answers: list[dict]) -> dict:
    outcomes = Counter(a["outcome"] for a in answers)
    times = [a["seconds"] for a in answers]
    return {"requests": len(answers), "outcomes": dict(outcomes.most_common()),
            "median_s": round(statistics.median(times), 3) if times else None,
            "max_s": round(max(times), 3) if times else None}
