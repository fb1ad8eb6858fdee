"""Run under torchrun by test_ranks.py: a commit refused because rank 1's weights differ from rank 0's.

Both ranks build the trainer in RUN_DIR (argv[1]); rank 1 nudges one weight (a bug that
desynchronised the replicas); both save. The committer must refuse on every rank with an error
naming rank 1, and no checkpoint may be committed. Prints ``REFUSED <message>`` per rank.
"""

from __future__ import annotations

import sys

import torch

from resilient_train.checkpoint import CheckpointError
from resilient_train.config import compose
from resilient_train.dist import from_env
from resilient_train.train.trainer import Trainer


def main() -> int:
    group = from_env(torch.device("cpu"), 60)
    cfg = compose(["+experiment=tiny", "trainer.num_threads=1"])
    trainer = Trainer(cfg, sys.argv[1], group=group)
    if group.rank == 1:
        with torch.no_grad():
            next(iter(trainer.model.parameters())).view(-1)[0] += 1e-3
    try:
        trainer.save_checkpoint(val_loss=None, is_best=False)
    except CheckpointError as exc:
        print(f"REFUSED rank={group.rank} {exc}", flush=True)
        code = 3
    else:
        print(f"COMMITTED rank={group.rank}", flush=True)
        code = 0
    group.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
