"""
What the commands (sample.py, train.py, evaluate.py, bench.py) share: the device and dtype they run on, the CPU threads
they use, and how bad input ends: exit status 1 and one line naming the file or option and the problem, no traceback.
"""
import os
import sys

import torch
from tqdm import tqdm

from checkpoint import CheckpointError
from data import DataError


def pick_device(name):
    """--device: "auto" is CUDA when there is one, else the CPU; "cpu" and "cuda" as given, "cuda" only where
    there is one (else a one-line DataError, before any work)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device=cuda: CUDA is not available here; use --device=cpu (or auto)")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def pick_dtype(name, device):
    """--dtype: "auto" is bfloat16 on a GPU that has it, else float32; the others as named."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def bad_option(args, option, why):
    """The error for an option's value, as every command words it: "--option=value: why"."""
    return DataError(f"--{option}={getattr(args, option)}: {why}")


def one_line(error):
    """An error's message on one line; from a DataLoader worker, the original one."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return "; ".join(line.strip() for line in text.splitlines())


def run(main, argv=None, errors=(CheckpointError, DataError)):
    """Runs a command's main(argv); returns the exit status: 0, or 1 after printing an error of `errors` as one
    line (on a line of its own, even below a progress bar)."""
    try:
        main(argv)
    except errors as e:
        tqdm.write(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def use_free_cores():
    """Sets torch's CPU threads for a command run from the shell: as many as the cores free when it starts (the
    cores less the last minute's load average), at least one; OMP_NUM_THREADS, when set, is obeyed instead.
    Why: a thread that has no core of its own makes the others wait for it at every op. With OpenMP's default
    spin-waiting, the tiny training step ran 5-10x slower on a 2-core machine as soon as another job ran; the
    commands therefore set OMP_WAIT_POLICY=PASSIVE before they import torch (it is read only then), which bounds
    the loss (about 1.5x), and with one thread per free core there is none to lose. Torch's own default is one
    thread per core, whatever else runs."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system: all cores
        busy = 0.0
    torch.set_num_threads(max(1, min(cores, round(cores - busy))))
