"""Hostile requests against a running mlnb service: every one must get a 4xx (never a 5xx, never a dropped connection),
and a valid request must still be answered afterwards (issue 10, point 5).

The requests are generated from the service's own `/metadata` (its fields, an example record and its limits), seeded,
so a run is repeatable: wrong types for every field, numbers too big or not finite, NaN and Infinity literals, deep
nesting, bodies over the size limit (with a Content-Length and streamed without one), batches over the batch limit,
bytes that are not UTF-8, other encodings, unknown and missing fields, odd names, content types that are not JSON,
malformed request ids, bodies that are not records, and random byte mutations of a valid body (those may happen to
stay valid: a 200 there is right, a 5xx is not).

Usage: .venv/bin/python bench/fuzz.py --url http://127.0.0.1:3000 [--n 1200] [--seed 0] [--concurrency 4]
"""
import argparse, json, random, sys, time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import httpx

JSON = {"content-type": "application/json"}


def _record_cases(example: dict, fields: dict) -> list:
    "One bad value at a time, for every field."
    values = [True, False, "", "120.5", "1", "true", None, [], {}, [1], {"v": 1}, [[[[1]]]], 1.5, -1, -1e308, 1e308, 2**64, -2**63 - 1,
              10**30, "x" * 1000, "\u0000", "\U0001F600", "[[[[[[[[[[[[[[[[[[[[[[[[[[", "{" * 30]
    cases = []
    for name, spec in fields.items():
        for v in values:
            if v is None and spec.get("nullable"): continue
            if v == example[name] and type(v) is type(example[name]): continue
            if v == 1.5 and "int" not in spec["dtype"].lower(): continue  # a valid number there
            cases.append((f"type:{type(v).__name__}", json.dumps({**example, name: v}).encode(), JSON))
        raw = json.dumps({**example, name: 0})  # literals Python's json writes and JSON does not have, and numbers past a float
        for lit in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "0" * 400 + "1", "1" + "0" * 400, "0x10", "+1", ".5", "1."):
            cases.append(("number:literal", raw.replace(f'"{name}": 0', f'"{name}": {lit}').encode(), JSON))
        cases.append(("field:missing", json.dumps({k: v for k, v in example.items() if k != name}).encode(), JSON))
        cases.append(("string:surrogate", raw.replace(f'"{name}": 0', f'"{name}": "\\ud800"').encode(), JSON))
    return cases


def _body_cases(example: dict, limit: int, max_batch: int, rng: random.Random) -> list:
    ok, first = json.dumps(example).encode(), json.dumps(next(iter(example))).encode()
    cases = [(f"body:{b[:12]!r}", b, JSON) for b in (
        b"", b" ", b"\n\n", b"null", b"true", b"1", b'"record"', b"[]", b"[1, 2]", b"[null]", b"{}", b"[{}]", b"[[]]",
        ok[:-1], ok + b"}", ok + b" garbage", b"{'amount': 1}", b"// comment\n" + ok, b'{"a" 1}', b"{,}", b"[,]",
        b"\x00" * 64, b"\xef\xbb\xbf" + ok, ok.replace(b'"', b"'"), b"[" + b",".join([ok] * 3) + b",]")]
    cases += [("encoding:utf16", ok.decode().encode("utf-16"), JSON), ("encoding:utf32", ok.decode().encode("utf-32"), JSON),
              ("encoding:latin1", json.dumps({**example, "x": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"), JSON),
              ("encoding:overlong", ok[:-1] + b', "k": "\xc0\xaf"}', JSON), ("encoding:truncated", ok[:-1] + b', "k": "\xe2\x82"}', JSON),
              ("encoding:lone-continuation", b'{"\x80": 1}', JSON), ("encoding:invalid-bytes", bytes(rng.randrange(128, 256) for _ in range(200)), JSON)]
    for depth in (21, 50, 100, 1000, 10_000, 100_000):
        cases += [("nesting:[", b"[" * depth, JSON), ("nesting:[]", b"[" * depth + b"]" * depth, JSON),
                  ("nesting:{", b'{"a":' * depth + b"1" + b"}" * depth, JSON),
                  ("nesting:field", ok[:-1] + b", " + first + b": " + b"[" * depth + b"1" + b"]" * depth + b"}", JSON)]
    cases += [("nesting:in-string", json.dumps({**example, "k": "[" * 10_000}).encode(), JSON)]
    big = b"[" + b" " * limit + b"]"
    cases += [("size:content-length", big, JSON), ("size:value", json.dumps({**example, "k": "x" * limit}).encode(), JSON),
              ("size:streamed", None, JSON), ("size:batch", json.dumps([example] * (max_batch + 1)).encode(), JSON),
              ("size:bad-records", json.dumps([{**example, "k": i} for i in range(max_batch)]).encode(), JSON),
              ("size:half-limit-value", json.dumps({**example, next(iter(example)): "y" * (limit // 2)}).encode(), JSON),
              ("size:many-unknown", json.dumps({**example, **{f"k{i}": i for i in range(5000)}}).encode(), JSON),
              ("size:long-name", json.dumps({**example, "n" * 100_000: 1}).encode(), JSON)]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx",
                  "application/json; charset=latin-1", "application/json; charset=utf-16", "text/json", "*/*", "", "application/xml",
                  "application/json\x7f"):
        cases.append((f"content-type:{ctype[:24]}", ok, {"content-type": ctype}))
    cases.append(("content-type:missing", ok, {}))
    for rid in ("", "x" * 129, "a b", "id\t1", "caf\u00e9", "\x7f"):
        cases.append(("request-id:malformed", ok, {**JSON, "x-request-id": rid.encode("latin-1")}))
    cases += [("record:unknown", json.dumps({**example, "coupon": "X"}).encode(), JSON),
              ("record:unknown-empty-name", json.dumps({**example, "": 1}).encode(), JSON),
              ("record:unknown-surrogate-name", ok[:-1] + b', "\\udfff": 1}', JSON),
              ("record:not-object", json.dumps([example, 1, "x", None, []]).encode(), JSON)]
    return cases


def _mutations(example: dict, n: int, rng: random.Random) -> list:
    "Random byte flips, insertions and deletions of a valid body."
    ok, out = bytearray(json.dumps(example).encode()), []
    for _ in range(n):
        b = bytearray(ok)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            op = rng.random()
            if op < 0.4: b[i] = rng.randrange(256)
            elif op < 0.7: b.insert(i, rng.choice(b'[]{}",:\\\x00\xff0123456789eE-+.'))
            else: del b[i]
        out.append(("mutation", bytes(b), JSON))
    return out


def bad_requests(meta: dict, n: int = 1200, seed: int = 0) -> list:
    "At least `n` hostile requests `(kind, body, headers)` for the service whose `/metadata` is `meta`."
    rng = random.Random(seed)
    example, fields = meta["example"], meta["fields"]
    limits = meta.get("limits") or {"max_request_bytes": 1 << 20, "max_batch": 1000}  # a service from before limits were shown
    cases = _record_cases(example, fields) + _body_cases(example, limits["max_request_bytes"], limits["max_batch"], rng)
    return cases + _mutations(example, max(0, n - len(cases)), rng)


def _streamed(limit: int):
    yield b"["
    for _ in range(limit // 65536 + 2): yield b" " * 65536
    yield b"]"


def run(url: str, n: int = 1200, seed: int = 0, concurrency: int = 4) -> dict:
    "Send the requests; returns `{status or error: count}`, counts by kind of the non-4xx ones, a sample of bodies, and timings."
    with httpx.Client(base_url=url, timeout=60) as c:
        meta = c.get("/metadata").json()
        cases = bad_requests(meta, n, seed)
        limit = (meta.get("limits") or {}).get("max_request_bytes", 1 << 20)

        def send(case):
            kind, body, headers = case
            t = time.perf_counter()
            try:
                r = c.post("/predict", content=_streamed(limit) if body is None else body, headers=headers)
                return kind, r.status_code, len(r.content), time.perf_counter() - t, r.text[:200]
            except httpx.HTTPError as e:
                return kind, type(e).__name__, 0, time.perf_counter() - t, str(e)[:200]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex: results = list(ex.map(send, cases))
        elapsed = time.perf_counter() - t0
        after = c.post("/predict", json=meta["example"])
    statuses = Counter(s for _, s, *_ in results)
    odd = Counter(k.split(":")[0] + f" -> {s}" for k, s, *_ in results if not (isinstance(s, int) and 400 <= s < 500))
    return {"requests": len(results), "statuses": dict(sorted(statuses.items(), key=str)), "not_4xx": dict(odd),
            "server_errors": sum(1 for _, s, *_ in results if not isinstance(s, int) or s >= 500),
            "largest_answer_bytes": max(size for _, _, size, *_ in results), "slowest_s": round(max(t for *_, t, _ in results), 3),
            "seconds": round(elapsed, 1), "valid_after": after.status_code,
            "samples": {k: text for k, s, _, _, text in results if isinstance(s, int) and s >= 500}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    res = run(a.url, a.n, a.seed, a.concurrency)
    print(json.dumps(res, indent=1))
    sys.exit(0 if res["server_errors"] == 0 and res["valid_after"] == 200 else 1)


if __name__ == "__main__":
    main()
