#!/usr/bin/env python3
"""A small stand-in for density-engine's `scripts/run_garch_jobs.py` (numpy + pyarrow only).

For each CSV row `eta,lam,var0,alpha,gamma,beta,p` it simulates `--num_sim` paths of a
GJR-GARCH(1,1) with Hansen skewed-t shocks and records `--num_quantiles` quantiles of
the cumulative return (normalised by sqrt(t)) at a few time points. The process is in
"reduced" form, as upstream: the long-run variance is 1, so `var0` is the starting
variance relative to it, and omega = 1 - alpha - gamma * P0 - beta with
P0 = E[z^2; z < 0].

    python garch_worker.py INPUT.csv --num_sim N --num_quantiles Q --stride S
                           [--output-dir DIR] [--seed K]

`--stride S` processes every S-th row from row 0 (upstream's streaming mode). Output:
one parquet file, written at the end to a temp name and renamed, beside the input (or
in DIR): `<stem>_0_streaming_<S>_<N>_<Q>.parquet`, columns
`alpha gamma beta var0 eta lam num_sim_paths job_row ti p x` (x: Q float32 quantiles).
Prints `Row N: ...` per row; on any error prints `error: ...` to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("eta", "lam", "var0", "alpha", "gamma", "beta", "p")
PARAMS = ("alpha", "gamma", "beta", "var0", "eta", "lam", "p")
OUTPUT_COLUMNS = (*PARAMS[:6], "num_sim_paths", "job_row", "ti", "p", "x")
TIME_POINTS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50)


class JobError(Exception):
    """A problem with the input; reported on stderr with exit code 1."""


def hansen_constants(eta: float, lam: float) -> tuple[float, float, float]:
    """(a, b, c) of Hansen's (1994) skewed t with `eta` degrees of freedom and skew `lam`."""
    c = math.exp(math.lgamma((eta + 1) / 2) - math.lgamma(eta / 2)) / math.sqrt(math.pi * (eta - 2))
    a = 4 * lam * c * (eta - 2) / (eta - 1)
    b = math.sqrt(1 + 3 * lam * lam - a * a)
    return a, b, c


def hansen_pdf(z: np.ndarray, eta: float, lam: float) -> np.ndarray:
    """Density of the standardised (mean 0, variance 1) skewed t."""
    a, b, c = hansen_constants(eta, lam)
    y = b * z + a
    scale = np.where(y < 0, 1 - lam, 1 + lam)
    return b * c * (1 + (y / scale) ** 2 / (eta - 2)) ** (-(eta + 1) / 2)


def left_second_moment(eta: float, lam: float) -> float:
    """P0 = E[z^2; z < 0], by quadrature on a log grid (the tail past 1e5 is negligible)."""
    r = np.geomspace(1e-9, 1e5, 20_001)
    f = r * r * hansen_pdf(-r, eta, lam)
    return float(np.sum((f[1:] + f[:-1]) * np.diff(r)) / 2)


def skewt_shocks(rng: np.random.Generator, eta: float, lam: float, size: int) -> np.ndarray:
    """Exact draws: pick a side with probability (1 -/+ lam)/2, scale a unit-variance |t|."""
    a, b, _ = hansen_constants(eta, lam)
    u = np.abs(rng.standard_t(eta, size)) * math.sqrt((eta - 2) / eta)
    left = rng.random(size) < (1 - lam) / 2
    y = np.where(left, -(1 - lam) * u, (1 + lam) * u)
    return (y - a) / b


def simulate_row(
    params: dict[str, float], num_sim: int, num_quantiles: int, rng: np.random.Generator
) -> np.ndarray:
    """Quantiles (len(TIME_POINTS) x Q) of sum(r_1..r_t) / sqrt(t) over `num_sim` paths."""
    eta, lam = params["eta"], params["lam"]
    alpha, gamma, beta = params["alpha"], params["gamma"], params["beta"]
    persistence = alpha + gamma * left_second_moment(eta, lam) + beta
    if persistence >= 1:
        raise JobError(f"non-stationary parameters (alpha + gamma*P0 + beta = {persistence:.4f})")
    omega = 1 - persistence
    probs = (np.arange(num_quantiles) + 0.5) / num_quantiles
    var = np.full(num_sim, params["var0"])
    cum = np.zeros(num_sim)
    out = np.empty((len(TIME_POINTS), num_quantiles), dtype=np.float32)
    k = 0
    for t in range(1, TIME_POINTS[-1] + 1):
        z = skewt_shocks(rng, eta, lam, num_sim)
        r = np.sqrt(var) * z
        cum += r
        var = omega + (alpha + gamma * (z < 0)) * r * r + beta * var
        if t == TIME_POINTS[k]:
            out[k] = np.quantile(cum / math.sqrt(t), probs)
            k += 1
    return out


def read_rows(path: Path) -> list[dict[str, float]]:
    """The parameter rows, checked; JobError says what is wrong and where."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise JobError(f"{path.name}: missing column(s) {', '.join(missing)}")
            rows = []
            for number, raw in enumerate(reader):
                try:
                    row = {c: float(raw[c]) for c in COLUMNS}
                except (TypeError, ValueError):
                    raise JobError(f"row {number}: not a number in {raw!r}") from None
                if not (row["eta"] > 2 and -1 < row["lam"] < 1 and row["var0"] > 0):
                    raise JobError(f"row {number}: need eta > 2, -1 < lam < 1, var0 > 0")
                if min(row["alpha"], row["gamma"], row["beta"]) < 0:
                    raise JobError(f"row {number}: alpha, gamma and beta must be >= 0")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise JobError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise JobError(f"{path.name}: no data rows")
    return rows


def output_name(input_path: Path, stride: int, num_sim: int, num_quantiles: int) -> str:
    return f"{input_path.stem}_0_streaming_{stride}_{num_sim}_{num_quantiles}.parquet"


def run(args: argparse.Namespace) -> Path:
    input_path = Path(args.input)
    if args.num_sim < 2 or args.num_quantiles < 1 or args.stride < 1:
        raise JobError("--num_sim must be >= 2, --num_quantiles and --stride >= 1")
    rows = read_rows(input_path)
    out_dir = Path(args.output_dir) if args.output_dir else input_path.parent
    columns: dict[str, list[object]] = {name: [] for name in OUTPUT_COLUMNS}
    for number in range(0, len(rows), args.stride):
        row = rows[number]
        print(f"Row {number}: {[row[c] for c in COLUMNS]}", flush=True)
        rng = np.random.default_rng([args.seed, number])
        quantiles = simulate_row(row, args.num_sim, args.num_quantiles, rng)
        for ti, q in zip(TIME_POINTS, quantiles, strict=True):
            for name in PARAMS:
                columns[name].append(row[name])
            columns["num_sim_paths"].append(args.num_sim)
            columns["job_row"].append(number)
            columns["ti"].append(ti)
            columns["x"].append(q)
    f32, i64 = pa.float32(), pa.int64()
    types = {"num_sim_paths": i64, "job_row": i64, "ti": i64, "x": pa.list_(f32)}
    table = pa.table(
        {name: pa.array(values, type=types.get(name, f32)) for name, values in columns.items()}
    )
    final = out_dir / output_name(input_path, args.stride, args.num_sim, args.num_quantiles)
    # Short, hidden, and not matching `*.parquet`: never mistaken for a result.
    temp = out_dir / f".garch_worker.{os.getpid()}.part"
    try:
        pq.write_table(table, temp)
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    print(
        f"Saved {final.name} ({table.num_rows} records, {len(range(0, len(rows), args.stride))} rows)"
    )
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="the job CSV (eta,lam,var0,alpha,gamma,beta,p)")
    parser.add_argument("--num_sim", type=int, default=10_000, help="paths per row")
    parser.add_argument("--num_quantiles", type=int, default=512, help="quantiles per time point")
    parser.add_argument("--stride", type=int, default=1, help="process every S-th row")
    parser.add_argument("--output-dir", default=None, help="default: beside the input")
    parser.add_argument("--seed", type=int, default=0, help="random seed (per row: seed, row)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (JobError, OSError, pa.ArrowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
