"""What every benchmark prints above its table: hardware, torch version, date."""

import datetime
import os
import platform

import torch


def describe() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    host = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"date {datetime.date.today()} | {host} | {gpu} | torch {torch.__version__}"
