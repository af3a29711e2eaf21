"""One process of the 2-process streamed-exemplar check in test_methods_experience_replay.py (torch.distributed.run,
gloo, ACCELERATE_USE_CPU=true).

Each process streams its shard of a synthetic task (``stream_of``: each example's image encodes its id) through a
``StreamedExemplarBuffer`` for many seeds; rank 0 writes, per seed, the exemplar ids every process holds after the
merge (they must be the same), and how often each id was kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from hf_r1ewc.methods import TaskEnd
from hf_r1ewc.methods.exemplars import StreamedExemplarBuffer


sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_methods_experience_replay import CLASS_SIZES, MODEL, ids_of, stream_of  # noqa: E402


def main(out: str, seeds: int) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    kept = torch.zeros(sum(CLASS_SIZES.values()))
    differ = 0
    for seed in range(seeds):
        buffer = StreamedExemplarBuffer(per_class=3, source="synthetic")
        buffer.add_task(
            TaskEnd(1, MODEL, stream_of(CLASS_SIZES, rank, world), list(CLASS_SIZES), seed, None, accelerator, False)
        )
        ids = ids_of(buffer.stored)
        everyone = accelerator.gather(torch.tensor(ids)[None]).tolist()
        differ += any(other != ids for other in everyone)
        kept[ids] += 1
    if rank == 0:
        Path(out).write_text(json.dumps({"differ": differ, "kept": kept.tolist(), "world": world}))
    accelerator.end_training()  # destroys the process group: gloo left alive at exit can abort the interpreter


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
