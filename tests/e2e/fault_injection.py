"""`dscluster` with a fault injected into rank 0's sampling, for end-to-end tests of failure
containment: the sampling of a request whose seed is FAULT_SEED raises at its third token, as a
bug in rank-0-only code inside a step would. Everything else is the real program; started under
the local launcher like any rank (`dscluster launch --nproc 2 -- python fault_injection.py serve ...`)."""

import sys

from dscluster.engine import sampling

FAULT_SEED = 4242
_choose = sampling.RequestSampler.choose


def choose(self, logits):
    if self.seed == FAULT_SEED and len(self.output_ids) == 2:
        raise RuntimeError("injected sampling failure")
    return _choose(self, logits)


sampling.RequestSampler.choose = choose

if __name__ == "__main__":
    from dscluster.cli import main

    sys.exit(main(sys.argv[1:]))
