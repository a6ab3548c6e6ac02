"""Pictures of a simulated run and of a benchmark sweep, with matplotlib (``pip install
-e ".[plot]"``): imported only when a plot is asked for, so the simulator and the
benchmarks themselves need neither it nor numpy."""

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


def plot_sweep(rows: list[dict], prefix: str | Path, title: str = "") -> list[Path]:
    """A ``bench sweep``'s pictures, ``PREFIX_throughput.png`` (output tokens/s against
    instances, a line per mode, at the highest rate), ``PREFIX_latency.png`` (mean TTFT
    and TPOT against the request rate, per mode, on the most instances; with rates
    other than all at once),
    ``PREFIX_context.png`` (the longest request the cluster holds against instances)
    and ``PREFIX_distributions.png`` (TTFT and TPOT CDFs per mode, most instances,
    highest rate). Returns the paths written."""
    plt = _pyplot()
    prefix = Path(prefix)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    top_rate = max(r["request_rate"] for r in rows)
    top_n = max(r["instances"] for r in rows)
    counts = sorted({r["instances"] for r in rows})
    at_rate = "all at once" if top_rate == float("inf") else f"{top_rate:g} requests/s"
    paths = []

    def save(fig, name: str) -> None:
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = prefix.with_name(f"{prefix.name}_{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    def against_instances(key: str, label: str, name: str, subtitle: str = "") -> None:
        """``key`` against instances, a line per mode, at the highest rate."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in modes:
            chosen = sorted((r for r in rows if r["mode"] == mode
                             and r["request_rate"] == top_rate), key=lambda r: r["instances"])
            ax.plot([r["instances"] for r in chosen], [r[key] for r in chosen], marker="o",
                    label=mode)
        ax.set_xlabel("instances")
        ax.set_xticks(counts)
        ax.set_ylabel(label)
        if subtitle:
            ax.set_title(subtitle)
        ax.legend()
        save(fig, name)

    against_instances("output_throughput", "output tokens / s", "throughput",
                      f"throughput, {at_rate}")

    if any(r["request_rate"] != float("inf") for r in rows):  # latency against the rate
        fig, (ttft, tpot) = plt.subplots(1, 2, figsize=(10, 4))
        for mode in modes:
            chosen = sorted((r for r in rows if r["mode"] == mode and r["instances"] == top_n
                             and r["request_rate"] != float("inf")),
                            key=lambda r: r["request_rate"])
            rates = [r["request_rate"] for r in chosen]
            ttft.plot(rates, [r["mean_ttft_ms"] for r in chosen], marker="o", label=mode)
            tpot.plot(rates, [r["mean_tpot_ms"] for r in chosen], marker="o", label=mode)
        for ax, name in ((ttft, "mean TTFT (ms)"), (tpot, "mean TPOT (ms)")):
            ax.set_xlabel("request rate (/s)")
            ax.set_ylabel(name)
            ax.legend()
        ttft.set_title(f"{top_n} instances")
        save(fig, "latency")

    against_instances("longest_request_tokens", "longest request (tokens)", "context")

    fig, (ttft, tpot) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in modes:
        for r in rows:
            if r["mode"] == mode and r["instances"] == top_n and r["request_rate"] == top_rate:
                for ax, values in ((ttft, r["ttfts"]), (tpot, r["tpots"])):
                    ms = sorted(v * 1000 for v in values)
                    ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post",
                            label=mode)
    for ax, name in ((ttft, "TTFT (ms)"), (tpot, "TPOT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("share of requests")
        ax.legend()
    ttft.set_title(f"{top_n} instances, {at_rate}")
    save(fig, "distributions")
    return paths
