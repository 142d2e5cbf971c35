"""What the ensemble's per-request version check costs: ``PredictorMemberCaller.current_version`` (one
lease of the version a member call would use, taken and released) on a real embedded server over two tiny
exported models. The ensemble runs it once per member and request, so that a member's new version gets views
of its own input size.

    .venv/bin/python scripts/member_version_cost.py --rounds 5 --calls 20000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures and tests.ensemble.servers build the tiny models and server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20000, help="calls per member and round")
    args = parser.parse_args(argv)

    from carclf.ensemble.config import load_config
    from carclf.ensemble.members import PredictorMemberCaller
    from tests.ensemble.servers import embedded_server, write_ensemble_config
    from tests.fixtures import export_tiny

    work = Path(tempfile.mkdtemp(prefix="member_version_cost_"))
    try:
        repository = work / "repository"
        export_tiny(repository, "tiny_a", seed=1)
        export_tiny(repository, "tiny_b", seed=3)
        config = write_ensemble_config(work / "config")
        with embedded_server(repository, work / "server", ensembles=[config]) as server:
            caller = PredictorMemberCaller(server.predictor)
            members = load_config(config).members
            for number in range(args.rounds):
                start = time.perf_counter()
                for _ in range(args.calls):
                    for member in members:
                        caller.current_version(member)
                per_call_us = (time.perf_counter() - start) / (args.calls * len(members)) * 1e6
                print(f"round {number}: {per_call_us:.2f} us per member and request", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
