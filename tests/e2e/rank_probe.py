"""One rank of a launcher test: discover the rendezvous, join a gloo group, all-reduce, and print one
JSON line with what was found.

Run it under any launcher (torchrun, mpirun, the deepspeed launcher, `dscluster launch`). The
deepspeed launcher appends `--local_rank=N` to the arguments; it is accepted and reported, never
required.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    argv_local_rank = None
    for i, arg in enumerate(argv):
        if arg.startswith(("--local_rank=", "--local-rank=")):
            argv_local_rank = int(arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            argv_local_rank = int(argv[i + 1])

    # What the launcher itself put in the environment, before discover() exports anything.
    launcher_local_size = os.environ.get("LOCAL_SIZE")

    from dscluster.cluster.group import check_all_reduce, destroy_groups, init_groups
    from dscluster.cluster.rendezvous import discover

    rdzv = discover()
    groups = init_groups(rdzv, backend="gloo", timeout_s=60)
    try:
        total = check_all_reduce(groups)
    finally:
        destroy_groups()
    report = json.loads(rdzv.to_json())
    report.update(
        all_reduce=total,
        backend=groups.backend,
        exported_local_size=os.environ.get("LOCAL_SIZE"),
        launcher_local_size=launcher_local_size,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        argv_local_rank=argv_local_rank,
    )
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    from dscluster.cluster.group import exit_now_if_joined

    sys.exit(exit_now_if_joined(main(sys.argv[1:])))  # as the product does: no teardown abort
