"""One training process for tests/test_distributed.py, started by torchrun (or by hand with RANK/WORLD_SIZE set):
argv[1] is a JSON object {release, t5, data, out, settings, die_rank (optional)}."""
import json
import os
import sys

import torch


def main() -> int:
    from magnet import MagnetModel, distributed
    from magnet.errors import MagnetError
    from magnet.train import TrainSettings, train_lora
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    try:
        group = distributed.setup("cpu")
        if args.get("die_rank") == group.rank:
            os._exit(3)                                # a process that dies after joining
        model = MagnetModel.from_pretrained(args["release"], text_encoder=args["t5"], device="cpu")
        res = train_lora(model, args["data"], args["out"], TrainSettings(**args["settings"]))
        report = {"rank": group.rank, "world": group.world, "steps": res.steps_done, "losses": res.losses}
        with open(f"{args['out']}.rank{group.rank}.json", "w") as f:       # one file each: stdout lines interleave
            json.dump(report, f)
    except MagnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
