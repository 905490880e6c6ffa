"""Test driver (tests/distributed): ``milkit train CONFIG --out OUT/<stem> EXTRA…`` for several
configs, one after the other, in one process. Under Lightning's ``ddp`` every rank re-runs this
script, so the ranks train each experiment together and keep one process group throughout
(as the stages of one run do); one job instead of one per method keeps the tests' start-up
cost (every rank imports torch and Lightning) to two processes.

Usage: ``python ddp_job.py OUT CONFIG… -- EXTRA…``
"""

import sys
from pathlib import Path

from milkit.cli import main

if __name__ == "__main__":
    out, *rest = sys.argv[1:]
    configs, extra = (rest[: rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    for cfg in configs:
        code = main(["train", cfg, "--out", str(Path(out) / Path(cfg).stem), *extra])
        if code:
            sys.exit(code)
