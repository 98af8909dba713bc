"""Benchmark: import a 1,000,000-row SYNTHETIC 1m CSV into a fresh database.

    python benchmarks/bench_import.py [--rows N] [--json FILE]

Uses MMATS_DATABASE_URL if set (a fresh database is created on that server and dropped
afterwards); otherwise starts a temporary embedded server in a temp dir, as the tests do.
Prints rows/second for parse+validate, COPY+insert and the total, the aggregate refresh
time, and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchdb import fresh_database

from workers.ingest.importer import import_file

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mmats-bench-"))
    home.chmod(0o711)
    try:
        # generated in a child process, so that peak RSS below is the import's own
        t = time.perf_counter()
        csv = home / "BTC-USDT_1m.csv"
        subprocess.run([sys.executable, "-c", "import sys; from workers.ingest.synthetic "
                        "import generate_file; generate_file(sys.argv[1], 'BTC/USDT', "
                        "'crypto', bars=int(sys.argv[2]), seed=42)", str(csv), str(args.rows)],
                       check=True, cwd=ROOT)
        gen_s = time.perf_counter() - t
        with fresh_database(home) as url, psycopg.connect(url, autocommit=True) as conn:
            rep = import_file(conn, csv, symbol="BTC/USDT", market="crypto", timeframe="1m")
            again = import_file(conn, csv, symbol="BTC/USDT", market="crypto", timeframe="1m")
        s = rep.seconds
        import_s = s["parse"] + s["write"]
        figures = {
            "rows": rep.rows_read, "inserted": rep.inserted,
            "file_mb": round(csv.stat().st_size / 1e6, 1),
            "generate_s": round(gen_s, 2),
            "parse_validate_s": round(s["parse"], 2),
            "parse_validate_rows_per_s": round(rep.rows_read / s["parse"]),
            "copy_insert_s": round(s["write"], 2),
            "copy_insert_rows_per_s": round(rep.rows_read / s["write"]),
            "total_s": round(import_s, 2),
            "total_rows_per_s": round(rep.rows_read / import_s),
            "refresh_aggregates_s": round(s["refresh"], 2),
            "total_with_refresh_rows_per_s": round(rep.rows_read / s["total"]),
            "reimport_s": round(again.seconds["total"], 2),
            "reimport_unchanged": again.unchanged,
            "peak_rss_mb_import": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)
    width = max(map(len, figures))
    for k, v in figures.items():
        print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
