"""Run a real program as if it held VRAM on the simulated GPU.

    python -m gpu_manager.sim.hold --vram-mb N [--name NAME] [--device D] -- COMMAND [ARG...]

A real server that runs on the CPU (llama.cpp's OpenAI server, say) holds no simulated VRAM
of its own, so the simulated probe would never see it. This registers the MB for its own pid
in the simulated GPU's registry (`$GPU_MANAGER_SIM_DIR`, as for the stand-ins), then execs
COMMAND in the same process: same pid, same create time, so the registration is the real
server's. It counts while that process lives and is released (after the simulated driver's
teardown delay) once it dies, whatever kills it: the daemon's stop, a crash, kill -9. So
reclaim, attribution by pid, and preemption follow the real process exactly as for a
stand-in. The process's RSS is not VRAM: what it "holds" is what `--vram-mb` declares.

If the simulated GPU lacks the room, it fails like CUDA does: "CUDA out of memory" on stderr
and exit code 3, without running COMMAND.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpu_manager.paths import sim_dir
from gpu_manager.sim.registry import SimRegistry, hold

EXIT_NOT_FOUND = 127  # what a shell answers for a command it cannot run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpu_manager.sim.hold",
                                description="Exec COMMAND holding N MB of simulated VRAM.")
    p.add_argument("--vram-mb", type=int, required=True)
    p.add_argument("--name", default=None, help="the registration's name [default: COMMAND]")
    p.add_argument("--device", type=int, default=None,
                   help="the card [default: the first the daemon placed it on, else 0]")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("a COMMAND to run is required (after --)")
    if args.vram_mb < 0:
        p.error("--vram-mb must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # on the cards the daemon handed it (by our UUIDs), as the stand-ins hold them
    name = args.name or os.path.basename(args.command[0])
    refused = hold(SimRegistry(sim_dir()), args.vram_mb, name, args.device)
    if refused is not None:
        return refused
    try:
        os.execvp(args.command[0], args.command)  # never returns on success
    except OSError as exc:
        # The registration dies with this process (the registry checks pid + create time).
        print(f"cannot run {args.command[0]}: {exc.strerror or exc}", file=sys.stderr,
              flush=True)
        return EXIT_NOT_FOUND


if __name__ == "__main__":
    sys.exit(main())
