"""A test service with a family: children in its group and, optionally, a double-forked
grandchild that escaped the group with setsid(). Writes every pid to --pidfile (JSON).

    python -m tests.support.family --pidfile F [--ignore-sigterm] [--children N] [--grandchild]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SLEEPER = "import signal, time\n{ign}\nwhile True: time.sleep(60)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pidfile", type=Path, required=True)
    ap.add_argument("--ignore-sigterm", action="store_true")
    ap.add_argument("--children", type=int, default=0)
    ap.add_argument("--grandchild", action="store_true")
    args = ap.parse_args()
    ign = "signal.signal(signal.SIGTERM, signal.SIG_IGN)" if args.ignore_sigterm else ""
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kids = [subprocess.Popen([sys.executable, "-c", SLEEPER.format(ign=ign)]).pid
            for _ in range(args.children)]
    grandchild = None
    if args.grandchild:
        r, w = os.pipe()
        if os.fork() == 0:  # first child: leave the session, fork the daemon, exit
            os.setsid()
            if os.fork() == 0:
                os.close(r)
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    time.sleep(60)
            os._exit(0)
        os.close(w)
        grandchild = int(os.read(r, 32))
        os.wait()
    tmp = args.pidfile.with_suffix(".tmp")
    tmp.write_text(json.dumps({"leader": os.getpid(), "children": kids,
                               "grandchild": grandchild}))
    os.replace(tmp, args.pidfile)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
