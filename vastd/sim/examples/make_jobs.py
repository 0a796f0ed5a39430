#!/usr/bin/env python3
"""Generate GARCH job files in the real format, deterministically from a seed.

    python make_jobs.py FOLDER [--jobs N] [--rows R] [--seed K] [--prefix garch_test_job]

Files are named like upstream's: `<prefix>_<first row>_<last row>.csv`, numbers padded
to at least 4 digits, header `eta,lam,var0,alpha,gamma,beta,p`. Each is written under a
dot-name and renamed, so FOLDER may be a live inbox. Parameter ranges: eta 4..30
(log-uniform), lam -0.5..0.5, var0 0.1..10 (log-uniform; relative to the long-run
variance, as upstream), alpha 0.01..0.1, gamma 0..0.15, beta 0.8..0.95 with
alpha + gamma + beta < 0.99 (stationary whatever the skew), p uniform in (0, 1)
(upstream's train/test split coordinate, passed through).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

HEADER = "eta,lam,var0,alpha,gamma,beta,p"


def _row(rng: np.random.Generator) -> str:
    eta = 4 * np.exp(np.log(30 / 4) * rng.random())
    lam = rng.uniform(-0.5, 0.5)
    var0 = 10 ** rng.uniform(-1, 1)
    while True:
        alpha, gamma, beta = rng.uniform(0.01, 0.1), rng.uniform(0, 0.15), rng.uniform(0.8, 0.95)
        if alpha + gamma + beta < 0.99:
            break
    p = rng.random()
    return ",".join(f"{v:.8g}" for v in (eta, lam, var0, alpha, gamma, beta, p))


def make_jobs(
    folder: Path, n_jobs: int, rows_per_job: int, seed: int, prefix: str = "garch_test_job"
) -> list[Path]:
    """Write `n_jobs` files of `rows_per_job` rows into `folder`; return their paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_jobs):
        first, last = i * rows_per_job, (i + 1) * rows_per_job - 1
        path = folder / f"{prefix}_{first:04d}_{last:04d}.csv"
        text = "\n".join([HEADER, *(_row(rng) for _ in range(rows_per_job))]) + "\n"
        temp = folder / f".{path.name}.{os.getpid()}.part"
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="garch_test_job")
    args = parser.parse_args()
    for path in make_jobs(args.folder, args.jobs, args.rows, args.seed, args.prefix):
        print(path)


if __name__ == "__main__":
    main()
