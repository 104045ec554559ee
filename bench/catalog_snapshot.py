"""Benchmark: snapshot a synthetic N-row catalog served over HTTP, against a naive baseline.

    python bench/catalog_snapshot.py --rows 1000000 [--latency-ms 0] [--baseline-rows 1000000]

Each part runs in its own fresh process (spawn), so each peak RSS is that part's alone:
  server    DevServer with a deterministic synthetic catalog (~50 skewed labels, 2% duplicate URLs)
  snapshot  take_snapshot(): the exact code the ``catalog_snapshot`` asset runs, into a temp local store
  baseline  the naive way: sequential page-by-page GETs into one list of dicts -> one pandas
            DataFrame -> drop_duplicates -> one Parquet file (on --baseline-rows, as it grows with N)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pseudolabel.catalog import CatalogSource, take_snapshot  # noqa: E402
from pseudolabel.storage import LocalObjectStore  # noqa: E402
from pseudolabel.testing.catalogs import SyntheticCatalog  # noqa: E402
from pseudolabel.testing.servers import DevServer  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_s() -> float:
    """CPU seconds this process used: steadier than wall time on a shared box."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(rows: int, latency_s: float, ready: Any, stop: Any) -> None:
    catalog = SyntheticCatalog(total=rows)
    with DevServer(catalog, total=rows, latency_s=latency_s, log_requests=False) as server:
        ready.put(server.catalog_url)
        stop.wait()


def run_snapshot(url: str, args: argparse.Namespace, results: Any) -> None:
    source = CatalogSource(url, page_size=args.page_size, max_concurrency=args.concurrency)
    with tempfile.TemporaryDirectory() as root:
        store = LocalObjectStore(root)
        started, cpu_started = time.perf_counter(), cpu_s()
        summary = take_snapshot(source, store, chunk_rows=args.chunk_rows)
        elapsed, cpu = time.perf_counter() - started, cpu_s() - cpu_started
        stored_mb = sum(info.size for info in store.list("catalog")) / 2**20
    results.put(
        {
            "rows_in": summary.rows + summary.duplicates_dropped,
            "rows": summary.rows,
            "duplicates": summary.duplicates_dropped,
            "parts": len(summary.parts),
            "labels": len(summary.label_histogram),
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "peak_rss_mb": peak_rss_mb(),
            "stored_mb": stored_mb,
        }
    )


def run_baseline(url: str, args: argparse.Namespace, results: Any) -> None:
    import httpx
    import pandas as pd

    rss_before_mb = peak_rss_mb()  # interpreter + imports: not part of the per-row cost
    started, cpu_started = time.perf_counter(), cpu_s()
    items: list[dict[str, Any]] = []
    with httpx.Client(timeout=30) as client:
        offset = 0
        while offset < args.baseline_rows:
            limit = min(args.page_size, args.baseline_rows - offset)
            page = client.get(url, params={"offset": offset, "limit": limit}).json()["trees"]
            if not page:
                break
            items.extend(page)
            offset += len(page)
    frame = pd.DataFrame(items).drop_duplicates("image_url")
    with tempfile.TemporaryDirectory() as root:
        frame.to_parquet(Path(root) / "catalog.parquet")
    results.put(
        {
            "rows_in": len(items),
            "rows": len(frame),
            "elapsed_s": time.perf_counter() - started,
            "cpu_s": cpu_s() - cpu_started,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before_mb,
        }
    )


def in_child(target: Any, *args: Any) -> dict[str, Any]:
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results))
    process.start()
    result = results.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="catalog size (up to 15_000_000)")
    parser.add_argument(
        "--baseline-rows", type=int, default=None, help="baseline size (default min(rows, 1M))"
    )
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--chunk-rows", type=int, default=250_000)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="server latency per request")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    args.baseline_rows = args.baseline_rows or min(args.rows, 1_000_000)

    context = mp.get_context("spawn")
    ready, stop = context.Queue(), context.Event()
    server = context.Process(target=serve, args=(args.rows, args.latency_ms / 1000, ready, stop), daemon=True)
    server.start()
    url = ready.get(timeout=60)
    print(
        f"catalog: {args.rows:,} synthetic rows at {url} (server process, latency {args.latency_ms:g} ms); "
        f"page_size={args.page_size} concurrency={args.concurrency} chunk_rows={args.chunk_rows:,}"
    )
    try:
        snap = in_child(run_snapshot, url, args)
        expected = SyntheticCatalog(total=args.rows).unique_urls()
        assert snap["rows"] == expected, f"snapshot kept {snap['rows']} rows, expected {expected}"
        snap_rate = snap["rows_in"] / snap["elapsed_s"]
        print(
            f"snapshot  (take_snapshot, as the asset): {snap['rows_in']:,} rows in {snap['elapsed_s']:.1f} s "
            f"= {snap_rate:,.0f} rows/s ({snap['cpu_s']:.1f} CPU s); peak RSS {snap['peak_rss_mb']:,.0f} MB; kept {snap['rows']:,} "
            f"unique ({snap['duplicates']:,} duplicates dropped), {snap['parts']} parts, "
            f"{snap['stored_mb']:,.0f} MB Parquet"
        )
        if args.skip_baseline:
            return
        base = in_child(run_baseline, url, args)
        base_rate = base["rows_in"] / base["elapsed_s"]
        per_row_mb = (base["peak_rss_mb"] - base["rss_before_mb"]) / max(1, base["rows_in"])
        scaled_gb = (base["rss_before_mb"] + per_row_mb * args.rows) / 1024
        print(
            f"baseline  (sequential pages -> list -> DataFrame): {base['rows_in']:,} rows in "
            f"{base['elapsed_s']:.1f} s = {base_rate:,.0f} rows/s ({base['cpu_s']:.1f} CPU s); peak RSS {base['peak_rss_mb']:,.0f} MB "
            f"(~{scaled_gb:,.1f} GB if scaled linearly to {args.rows:,} rows)"
        )
        print(
            f"ratio     snapshot/baseline throughput: {snap_rate / base_rate:.2f}x; "
            f"peak RSS snapshot {snap['peak_rss_mb']:,.0f} MB at {snap['rows_in']:,} rows vs baseline "
            f"{base['peak_rss_mb']:,.0f} MB at {base['rows_in']:,} rows"
        )
    finally:
        stop.set()
        server.join(timeout=10)


if __name__ == "__main__":
    main()
