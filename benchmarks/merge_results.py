"""Merge the results.json of sweeps over parts of one protocol into one results / summary table.

For sweeps that ran on machines whose run directories did not come back (only their results.json
did): rows are taken by cell id, the first file that has a cell wins, and the merged file lists the
protocol's cells that no file has as missing. `lnshift report OUT` then builds the report from it.

    python benchmarks/merge_results.py benchmarks/paper_protocol.yaml OUT a/results.json b/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lnshift import rundir as rd
from lnshift.config import environment
from lnshift.experiments.sweep_file import SWEEP_COPY, cells, load_sweep
from lnshift.experiments.sweep_results import write_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="the protocol's sweep file (it defines the cells)")
    parser.add_argument("out", type=Path, help="folder for results.* and summary.*")
    parser.add_argument("results", nargs="+", type=Path, help="results.json files, the preferred first")
    args = parser.parse_args()
    sweep = load_sweep(args.sweep)
    ids = [c.id for c in cells(sweep)]
    rows: dict[str, dict] = {}
    envs: dict[str, dict] = {}
    for path in args.results:
        part = json.loads(path.read_text())
        for env in part.get("run_environments", []):
            envs[json.dumps(env, sort_keys=True)] = env
        for row in part["rows"]:
            if row["id"] in ids:
                rows.setdefault(row["id"], row)
    ordered = [rows[i] for i in ids if i in rows]
    missing = [i for i in ids if i not in rows]
    common = {
        "sweep_file": str(sweep.path),
        "sweep": sweep.raw,
        "seeds": sweep.seeds,
        "environment": environment(),
        "merged_from": [str(p) for p in args.results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rd.write_text(args.out / SWEEP_COPY, sweep.text)
    write_tables(args.out, common, ordered, missing, len(ids), list(envs.values()))
    print(f"{len(ordered)} of {len(ids)} cells in {args.out}; {len(missing)} missing")


if __name__ == "__main__":
    main()
