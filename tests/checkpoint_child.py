"""A fit with checkpoints, run as a child process by ``test_checkpoint.py`` (so that it can be killed).

``python checkpoint_child.py DIR [--resume] [--kill-at STEP] [--slow SECONDS]``

Fits the tiny BERT on the separable toy task with a checkpoint at ``DIR/fit.ckpt``
every 2 steps; ``--kill-at`` sends itself SIGKILL after that step, ``--slow``
sleeps after every step (so that the parent can kill it from outside).  On
success writes ``DIR/final.safetensors`` (the guide's parameters) and
``DIR/history.json``; on Ctrl-C prints the interruption message and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from helpers import separable_dataset, small_spec, tiny_bert

from bhpeft_ppl.errors import FitInterrupted
from bhpeft_ppl.guides import GuideSpec
from bhpeft_ppl.infer import FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel

CONFIG = FitConfig(epochs=3, batch_size=8, lr=1e-2, checkpoint_every=2, progress=False)  # 40 examples: 15 steps
STEPS = 15


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def callback(state) -> None:
        if state.step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.slow)

    peft = inject(tiny_bert(), small_spec())
    model = BayesianHybridModel(peft, guide_spec=GuideSpec())
    try:
        result = fit(
            model, separable_dataset(40), CONFIG, checkpoint=args.dir / "fit.ckpt", resume=args.resume, callbacks=[callback]
        )
    except FitInterrupted as err:
        print(err, file=sys.stderr)
        return 130
    state = {k: v.detach().contiguous() for k, v in result.guide.state_dict().items()}
    save_file(state, args.dir / "final.safetensors")
    (args.dir / "history.json").write_text(json.dumps(result.history))
    return 0


if __name__ == "__main__":
    sys.exit(main())
