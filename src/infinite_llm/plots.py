"""Pictures of a simulated run, with matplotlib (``pip install -e ".[plot]"``): imported
only when a plot is asked for, so the simulator itself needs neither it nor numpy."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from infinite_llm.sim.timeline import Timeline


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError(
            'plots need matplotlib: pip install -e ".[plot]" (or pip install matplotlib)'
        ) from error
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(timeline: Timeline, path: str | Path, title: str = "") -> None:
    """Three panels over simulated time: tokens computed per second, the cluster's
    blocks in use (own KV, lent KV), and running and waiting requests."""
    plt = _pyplot()
    fig, (rate, blocks, queues) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    end = timeline.steps[-1].end_s if timeline.steps else 0.0
    width = max(timeline.interval_s, end / 200) or 1.0  # at most 200 bins
    bins = [0] * (int(end / width) + 1)
    for s in timeline.steps:
        bins[int(s.end_s / width)] += s.tokens
    rate.step([i * width for i in range(len(bins))], [n / width for n in bins], where="post",
              lw=0.8)
    rate.set_ylabel("tokens computed / s")
    totals: dict[float, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for x in timeline.samples:
        t = totals[x.time_s]
        t[0] += x.used_blocks
        t[1] += x.lent_blocks
        t[2] += x.running
        t[3] += x.waiting
    times = sorted(totals)
    blocks.stackplot(times, [totals[t][0] for t in times], [totals[t][1] for t in times],
                     labels=["own KV", "lent KV"])
    blocks.set_ylabel("blocks in use")
    blocks.legend(loc="upper left")
    queues.plot(times, [totals[t][2] for t in times], label="running")
    queues.plot(times, [totals[t][3] for t in times], label="waiting")
    queues.set_ylabel("requests")
    queues.set_xlabel("simulated time (s)")
    queues.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
