#!/usr/bin/env python3
"""Reads the soft-RoCE guest's result blocks (its second serial port), checks that every expected
result is there and passed, and writes target/softroce/bench.json: for each round, the bench's rows
plus one row for perftest's ib_write_lat (each row with its "round"), and the target check over
the rounds. Exit status 0 only when everything ran and passed.

Usage: report.py --results FILE --out DIR [--kernel V] [--perf-iters N] [--rounds R]
                 [--expect-bench] TEST...
"""

import argparse
import base64
import binascii
import json
import math
import re
import sys
from pathlib import Path

BEGIN = re.compile(r"^FTVM-RESULT-BEGIN (\S+) (\S+)$")
END = re.compile(r"^FTVM-RESULT-END (\S+) (\S+) rc=(-?\d+) secs=(\S+)$")
# commit p50 of the rdma medium must be within this factor of ib_write_lat's full round trip
TARGET_FACTOR = 1.2


def parse_results(path):
    """{(kind, name): {"rc": int, "secs": float, "text": str}} and whether FTVM-ALL-DONE came."""
    results, done, cur, buf = {}, False, None, []
    for raw in Path(path).read_text(errors="replace").splitlines():
        line = raw.strip("\r\n\x00 ")
        if line == "FTVM-ALL-DONE":
            done = True
            continue
        m = BEGIN.match(line)
        if m:
            cur, buf = (m.group(1), m.group(2)), []
            continue
        m = END.match(line)
        if m and cur == (m.group(1), m.group(2)):
            try:
                text = base64.b64decode("".join(buf), validate=True).decode(errors="replace")
            except (binascii.Error, ValueError) as e:
                text = f"<undecodable result block: {e}>"
            results[cur] = {"rc": int(m.group(3)), "secs": float(m.group(4)), "text": text}
            cur = None
            continue
        if cur is not None:
            buf.append(line)
    return results, done


def parse_perftest(text):
    """The numbers under perftest's latency header (µs, one-way = RTT/2), or None."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "#bytes" in line and "t_typical" in line:
            for row in lines[i + 1:]:
                cols = row.split()
                if len(cols) >= 9 and cols[0].isdigit():
                    try:
                        vals = [float(c) for c in cols[:9]]
                    except ValueError:
                        return None
                    if not all(math.isfinite(v) for v in vals):
                        return None  # e.g. inf when perftest's TSC calibration failed
                    keys = ["bytes", "iterations", "t_min_us", "t_max_us", "t_typical_us",
                            "t_avg_us", "t_stdev_us", "p99_us", "p999_us"]
                    return dict(zip(keys, vals))
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel", default="")
    ap.add_argument("--perf-iters", type=int, default=0)
    ap.add_argument("--expect-bench", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("tests", nargs="*")
    a = ap.parse_args()

    results, done = parse_results(a.results)
    logs = Path(a.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    for (kind, name), r in results.items():
        (logs / f"{kind}-{name}.log").write_text(r["text"])
    failures = []

    def check(kind, name, what):
        r = results.get((kind, name))
        if r is None:
            failures.append(f"{what}: no result (the guest died or timed out before it finished)")
            return None
        if r["rc"] != 0:
            why = " (timed out)" if r["rc"] == 124 else ""
            failures.append(f"{what}: exit status {r['rc']}{why} after {r['secs']} s")
        return r

    setup = check("setup", "network", "veth/rxe setup in the guest")
    if setup and setup["rc"] != 0:
        print("---- guest setup output ----\n" + setup["text"])
    env = {}
    if ("env", "env") in results:
        for line in results[("env", "env")]["text"].splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                env[k] = v

    print("\nsoft-RoCE results (QEMU/TCG guest, kernel %s, rxe0@veth0 <-> rxe1@veth1)" %
          env.get("kernel", a.kernel))
    for t in a.tests:
        r = check("test", t, f"test {t}")
        if r is not None:
            status = "ok" if r["rc"] == 0 else ("TIMEOUT" if r["rc"] == 124 else "FAILED")
            print(f"  test {t:<40} {status:<8} {r['secs']:>7.1f} s")
            if r["rc"] != 0:
                print(f"---- output of {t} ----\n{r['text']}---- end of {t} ----")
        else:
            print(f"  test {t:<40} MISSING")

    rows, rounds = [], []
    for r in range(1, a.rounds + 1):
        rows_r, rdma_row, lat = [], None, None
        if a.expect_bench:
            blog = check("bench-log", f"bench-{r}", f"round {r}: bench commit --transport rdma")
            bjson = results.get(("bench-json", f"bench-{r}"))
            if blog is not None and blog["rc"] != 0:
                print(f"---- round {r}: bench output ----\n" + blog["text"] +
                      "---- end of bench output ----")
            if bjson is None:
                failures.append(f"round {r}: bench commit: no JSON result")
            else:
                try:
                    rows_r = list(json.loads(bjson["text"])["rows"])
                except (ValueError, KeyError, TypeError) as e:
                    failures.append(f"round {r}: bench commit: unreadable JSON ({e})")
                names = [str(row.get("transport", row.get("medium", ""))) for row in rows_r]
                # The target is about the rdma medium proper; other rdma* rows (e.g. rdma-send)
                # are kept in the file but not checked.
                for name, row in zip(names, rows_r):
                    if name == "rdma" or (rdma_row is None and name.startswith("rdma")):
                        rdma_row = row
                if rows_r and rdma_row is None:
                    failures.append(f"round {r}: bench commit: no rdma row in its JSON")

        perf = check("perftest-client", f"ib_write_lat-{r}", f"round {r}: ib_write_lat client (rxe0)")
        check("perftest-server", f"ib_write_lat-{r}", f"round {r}: ib_write_lat server (rxe1)")
        lat = parse_perftest(perf["text"]) if perf else None
        if perf and lat is None:
            failures.append(f"round {r}: ib_write_lat: no usable latency line in its output "
                            "(missing, inf or nan)")
            print(f"---- round {r}: ib_write_lat output ----\n" + perf["text"])
        if lat:
            ib_row = {
                "transport": "ib_write_lat (rxe0<->rxe1, RTT/2)",
                "payload_bytes": int(lat["bytes"]),
                "count": int(lat["iterations"]),
                # perftest's one-way numbers (RTT/2), in the bench's columns
                "commit_p50_us": lat["t_typical_us"],
                "commit_p90_us": None,
                "commit_p99_us": lat["p99_us"],
                "commit_p999_us": lat["p999_us"],
                "commit_max_us": lat["t_max_us"],
                "raw_p50_us": lat["t_typical_us"],
                "raw_p99_us": lat["p99_us"],
                "overhead_ratio_p50": None,
                # and the full round trip (2x), what a commit's wait is compared with
                "rtt_p50_us": 2 * lat["t_typical_us"],
                "rtt_avg_us": 2 * lat["t_avg_us"],
                "rtt_p99_us": 2 * lat["p99_us"],
                "rtt_p999_us": 2 * lat["p999_us"],
                "half_rtt_avg_us": lat["t_avg_us"],
                "half_rtt_min_us": lat["t_min_us"],
                "perftest": "ib_write_lat -s 64 -n %d -F, server -d rxe1, client -d rxe0" %
                            int(lat["iterations"]),
            }
            if rows_r:
                # Same keys as the bench's rows first, then the extras.
                keys = list(rows_r[0].keys())
                ordered = {k: ib_row.get(k) for k in keys}
                ordered.update({k: v for k, v in ib_row.items() if k not in ordered})
                ib_row = ordered
            rows_r.append(ib_row)
            print(f"\n  round {r}: ib_write_lat 64 B x {int(lat['iterations'])} (perftest one-way"
                  f" = RTT/2): typical {lat['t_typical_us']:.2f} µs, avg {lat['t_avg_us']:.2f},"
                  f" p99 {lat['p99_us']:.2f}, p99.9 {lat['p999_us']:.2f}, max {lat['t_max_us']:.2f}"
                  f"  => full RTT typical {2 * lat['t_typical_us']:.2f} µs")
        for row in rows_r:
            row["round"] = r
        rows.extend(rows_r)
        if rdma_row is not None and lat:
            p50 = float(rdma_row.get("commit_p50_us"))
            rtt = 2 * lat["t_typical_us"]
            rounds.append({
                "round": r,
                "rdma_commit_p50_us": p50,
                "rdma_commit_p99_us": float(rdma_row.get("commit_p99_us", 0)),
                "raw_rdma_p50_us": float(rdma_row.get("raw_p50_us", 0)),
                "ib_write_lat_rtt_us": rtt,
                "ib_write_lat": lat,
                "ratio": p50 / rtt if rtt > 0 else float("inf"),
            })
            print(f"  round {r}: rdma commit p50 {p50:.2f} µs, p99 "
                  f"{rounds[-1]['rdma_commit_p99_us']:.2f} µs (raw rdma ping-pong p50 "
                  f"{rounds[-1]['raw_rdma_p50_us']:.2f} µs) => {rounds[-1]['ratio']:.2f}x RTT")

    target = None
    if rounds:
        ratios = sorted(x["ratio"] for x in rounds)
        median = ratios[len(ratios) // 2] if len(ratios) % 2 else \
            (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
        ok = median <= TARGET_FACTOR
        target = {
            "rule": f"median over rounds of rdma commit p50 / ib_write_lat full RTT (2 x t_typical)"
                    f" <= {TARGET_FACTOR}, each round's bench next to its own ib_write_lat",
            "rounds": [{k: v for k, v in x.items() if k != "ib_write_lat"} for x in rounds],
            "ratio": median,
            "pass": ok,
        }
        banner = "PASS" if ok else "FAIL"
        print("\n" + "#" * 78)
        print(f"# TARGET {banner}: rdma commit p50 / ib_write_lat RTT, median of {len(rounds)} "
              f"round(s) = {median:.2f}x (limit {TARGET_FACTOR}x; rounds: "
              + ", ".join(f"{x['rdma_commit_p50_us']:.1f}/{x['ib_write_lat_rtt_us']:.1f} µs"
                          for x in rounds) + ")")
        if not ok:
            print("# (reported only: the ratio does not fail CI; test failures do)")
        print("#" * 78)
    elif a.expect_bench:
        print("\n# TARGET: not computed (no rdma bench row or no ib_write_lat numbers)")

    # For the record: ib_write_lat at the commit's wire size (not part of the target).
    at_wire = None
    wire = results.get(("perftest-client", "ib_write_lat-wire"))
    wire_lat = parse_perftest(wire["text"]) if wire and wire["rc"] == 0 else None
    if wire_lat:
        commits = sorted(x["rdma_commit_p50_us"] for x in rounds)
        at_wire = {
            "bytes": int(wire_lat["bytes"]),
            "rtt_p50_us": 2 * wire_lat["t_typical_us"],
            "ib_write_lat": wire_lat,
        }
        line = (f"\n  ib_write_lat at the commit's wire size, {int(wire_lat['bytes'])} B: RTT typical "
                f"{2 * wire_lat['t_typical_us']:.2f} µs")
        if commits:
            median = commits[len(commits) // 2]
            at_wire["rdma_commit_p50_median_us"] = median
            at_wire["ratio"] = median / (2 * wire_lat["t_typical_us"])
            line += f"; median rdma commit p50 {median:.2f} µs = {at_wire['ratio']:.2f}x that"
        print(line)

    if not done:
        failures.append("the guest did not reach FTVM-ALL-DONE (it died, hung or was killed)")

    out = Path(a.out)
    doc = {
        "rows": rows,
        "ib_write_lat": [x["ib_write_lat"] for x in rounds],
        "target": target,
        "ib_write_lat_at_commit_wire_size": at_wire,
        "environment": {
            "guest": "QEMU TCG, Debian kernel " + env.get("kernel", a.kernel),
            "cpus": env.get("cpus"),
            "devices": "rxe0@veth0 10.99.0.1 (gid %s) <-> rxe1@veth1 10.99.0.2 (gid %s)" %
                       (env.get("FTVM_RDMA_GID_A", "?"), env.get("FTVM_RDMA_GID_B", "?")),
        },
        "tests": {t: results.get(("test", t), {}).get("rc") for t in a.tests},
        "passed": not failures,
    }
    if rows:
        (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {out / 'bench.json'}")
    if failures:
        print("\nsoftroce-ci: FAILED:", file=sys.stderr)
        for f in failures:
            print("  - " + f, file=sys.stderr)
        return 1
    print("\nsoftroce-ci: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
