"""The command line: `python -m magnet generate|vary|train|prepare|convert|download|evaluate|doctor ...` (see
`python -m magnet -h`). One module per subcommand, each with `add(subparsers)` and `run(args)`; what they share
(options, the number check, the models folder) is in `common` and `models`.

Every user error is one line on stderr naming the fix, never a traceback; the exit status is 0 on success, 2
for a user error, 1 out of memory, 130 interrupted."""
from __future__ import annotations

import os
import sys

from ..errors import MagnetError
from . import common, convert, doctor, download, evaluate, generate, prepare, train, vary

SUBCOMMANDS = (generate, vary, download, convert, evaluate, doctor, prepare, train)      # in the order -h lists them


def build_parser() -> common.Parser:
    ap = common.Parser(prog=common.PROG, description="MAGNeT text-to-music / text-to-sound.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for module in SUBCOMMANDS:
        module.add(sub)
    return ap


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 a user error, 1 out of memory, 130 interrupted).
    Every error is one line on stderr, never a traceback."""
    try:
        a = build_parser().parse_args(argv)
        return a.run(a)
    except SystemExit as e:          # -h / --help
        return e.code if isinstance(e.code, int) else 0
    except MagnetError as e:
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except MemoryError:
        return _fail(_OOM, 1)
    except OSError as e:             # a file the engine did not expect to fail (permissions, disk, network drive)
        where = f" {os.fsdecode(e.filename)}" if e.filename is not None else ""
        return _fail(f"error: {e.strerror or e}{':' + where if where else ''}. Check the path, its permissions "
                     f"and the free space.", 2)
    except RuntimeError as e:
        from ..audio import is_out_of_memory
        if is_out_of_memory(e):
            return _fail(_OOM, 1)
        raise


_OOM = ("error: ran out of memory: ask for a shorter duration (--seconds) or a smaller batch (fewer prompts at "
        "once), or use --dtype fp16 on a GPU.")


def _fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    return code


_parser = build_parser          # the name earlier code and tests import from magnet.__main__
