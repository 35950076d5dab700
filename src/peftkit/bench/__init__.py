"""The method arena (``peftkit bench``): a sweep runner and its report."""

from peftkit.bench.arena import BenchConfig, collect, run_sweep
from peftkit.bench.report import summarise, write_report

__all__ = ["BenchConfig", "collect", "run_sweep", "summarise", "write_report"]
