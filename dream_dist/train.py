"""Train DREAM: ``python -m dream_dist.train --config FILE [--section.key=value ...]``.

The same command runs on many processes under
``torchrun --nproc_per_node=N -m dream_dist.train ...``; flags are the config's
dotted keys, as a W&B sweep agent passes them (``--train.lr=0.003``).
"""

from __future__ import annotations

import logging

from dream_dist.config import parse_config
from dream_dist.errors import run_entry_point
from dream_dist.trainer import Trainer, TrainingDiverged

log = logging.getLogger("dream_dist.train")


def main(argv: list[str]) -> int:
    """Trains as the flags say; returns the exit status (1 when the loss diverged)."""
    cfg = parse_config(argv)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.fit()
    except TrainingDiverged as err:
        log.error("%s", err)
        return 1
    finally:
        trainer.close()


if __name__ == "__main__":
    run_entry_point(main, "dream_dist.train")
