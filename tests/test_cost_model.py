"""The step cost model: the fit on hand-made points, its file, and `infinite-llm profile`
measuring a tiny model end to end (the numbers it measures are not asserted: timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from infinite_llm.core.cost_model import CostModel, ProfilePoint


def test_the_fit_recovers_the_coefficients_of_exact_points():
    truth = CostModel(0.002, 0.0005, 1e-7)
    points = [ProfilePoint(b, s, truth.step_time(b, s)) for b in (1, 4, 16) for s in (100, 5000)]
    fit = CostModel.fit(points, {"model": "made up"})
    assert fit.fixed_s == pytest.approx(0.002, rel=1e-6)
    assert fit.per_token_s == pytest.approx(0.0005, rel=1e-6)
    assert fit.per_context_token_s == pytest.approx(1e-7, rel=1e-6)
    # Throughput grows with the batch (f(b)) and falls with the context (g).
    assert fit.decode_rate(16, 1000) > fit.decode_rate(4, 1000) > fit.decode_rate(1, 1000)
    assert fit.decode_rate(16, 100_000) < fit.decode_rate(16, 1000)
    assert fit.decode_rate(0, 0) == 0.0


def test_prefill_points_tell_the_cost_of_a_token_from_that_of_a_sequence():
    truth = CostModel(0.002, 0.0004, 1e-7, per_sequence_s=0.003)
    decode = [ProfilePoint(b, s, truth.step_time(b, s)) for b in (1, 4, 16) for s in (100, 5000)]
    prefill = [ProfilePoint(1, n, truth.step_time(n, n, sequences=1), tokens=n)
               for n in (128, 1024)]
    fit = CostModel.fit(decode + prefill)
    assert fit.per_token_s == pytest.approx(0.0004, rel=1e-6)
    assert fit.per_sequence_s == pytest.approx(0.003, rel=1e-6)
    assert fit.fixed_s == pytest.approx(0.002, rel=1e-6)
    # A decode step pays both per token; a prefill of 1,024 tokens pays one sequence.
    assert fit.step_time(4, 400) == pytest.approx(0.002 + 4 * 0.0034 + 400e-7)
    assert fit.step_time(1024, 1024, sequences=1) == pytest.approx(
        0.002 + 1024 * 0.0004 + 0.003 + 1024e-7)
    # Decode points alone cannot separate them: all of it is per token.
    alone = CostModel.fit(decode)
    assert alone.per_sequence_s == 0 and alone.per_token_s == pytest.approx(0.0034, rel=1e-6)


def test_a_negative_coefficient_is_dropped_not_kept():
    # Attention cost lost in noise: the context column would come out negative.
    points = [ProfilePoint(1, 100, 0.010), ProfilePoint(1, 9000, 0.0099),
              ProfilePoint(8, 100, 0.020), ProfilePoint(8, 9000, 0.0199)]
    fit = CostModel.fit(points)
    assert fit.per_context_token_s == 0.0 and fit.per_token_s > 0 and fit.fixed_s > 0


def test_the_file_round_trips(tmp_path):
    model = CostModel.fit(
        [ProfilePoint(1, 10, 0.01), ProfilePoint(2, 50, 0.02), ProfilePoint(4, 90, 0.035)],
        {"model": "x"},
    )
    model.save(tmp_path / "fit.json")
    assert CostModel.load(tmp_path / "fit.json") == model
    with pytest.raises(ValueError, match="at least 3"):
        CostModel.fit(model.points[:2])


def test_a_scaled_model_prices_decodes_and_prompts_by_their_own_factors(tmp_path):
    points = [ProfilePoint(1, 100, 0.010, engine_s=0.001), ProfilePoint(4, 800, 0.020),
              ProfilePoint(16, 6400, 0.050), ProfilePoint(1, 200, 0.011),
              ProfilePoint(4, 1600, 0.030), ProfilePoint(16, 12800, 0.090),
              ProfilePoint(2, 5000, 0.200, tokens=200)]
    model = CostModel.fit(points)
    slower = model.scaled(1.25, 0.8)
    for decode in [(4, 900), (16, 9000), (9, 3000)]:
        assert slower.step_time(*decode) == pytest.approx(1.25 * model.step_time(*decode))
    for prompts in [(300, 40000, 0, 2), (128, 9000, 0, 1)]:
        assert slower.step_time(*prompts) == pytest.approx(0.8 * model.step_time(*prompts))
    # 5 decodes beside 45 prompt tokens: a tenth at the decode factor.
    mixed = (50, 2000, 0, 10, 5)
    assert slower.step_time(*mixed) == pytest.approx(
        (0.1 * 1.25 + 0.9 * 0.8) * model.step_time(*mixed))
    assert model.scaled(2.0).step_time(300, 40000, 0, 2) == pytest.approx(
        2 * model.step_time(300, 40000, 0, 2))
    slower.save(tmp_path / "s.json")
    assert CostModel.load(tmp_path / "s.json") == slower
    with pytest.raises(ValueError, match="scale"):
        model.scaled(0)



def test_mixed_points_price_a_prompt_chunk_beside_decodes_and_nothing_else():
    """A mixed step (a prompt's chunk beside decodes) is priced by the line times the
    mixed points' ratio, along the chunk's tokens between the measured decodes (points
    of one shape at several contexts: their median); decode steps and steps of prompts
    are priced as without them, and a model without mixed points keeps the line."""
    decode = [ProfilePoint(b, b * s, 0.010 + 0.002 * b + 1e-6 * b * s)
              for b in (1, 4, 16) for s in (100, 1000)]
    prefill = [ProfilePoint(1, 128 * 129 // 2, 0.300, tokens=128),
               ProfilePoint(2, 1024 * 513, 1.500, tokens=1024)]
    plain = CostModel.fit(decode + prefill)
    line = plain.line

    def mixed(d, chunk, context, ratio):
        pairs = d * context + chunk * (chunk + 1) // 2
        return ProfilePoint(d + 1, pairs, ratio * line(d + chunk, pairs, 0, d + 1),
                            tokens=d + chunk, decodes=d)

    extra = [mixed(2, 64, 100, 1.5), mixed(2, 64, 1000, 1.3), mixed(2, 64, 500, 1.4),
             mixed(2, 256, 100, 1.2), mixed(8, 64, 100, 1.1), mixed(8, 256, 100, 1.0)]
    model = replace(plain, points=plain.points + tuple(extra))
    assert model.step_time(66, 5000, 0, 3, 2) == pytest.approx(1.4 * line(66, 5000, 0, 3))
    # Half way between 64 and 256 tokens at 2 decodes (1.4 -> 1.2), and at 5 decodes
    # half way between the rows of 2 and 8 (1.3 and 1.05).
    assert model.step_time(162, 9000, 0, 3, 2) == pytest.approx(1.3 * line(162, 9000, 0, 3))
    assert model.step_time(165, 9000, 0, 6, 5) == pytest.approx(1.175 * line(165, 9000, 0, 6))
    for step in [(4, 400), (16, 16000), (128, 8256, 0, 1), (700, 90000, 0, 2)]:
        assert model.step_time(*step) == pytest.approx(plain.step_time(*step))
    assert plain.step_time(66, 5000, 0, 3, 2) == pytest.approx(line(66, 5000, 0, 3))
    assert extra[0].decoding == 2 and decode[0].decoding == 1 and prefill[0].decoding == 0


def test_alone_prices_a_step_whose_neighbours_idle_by_its_tokens_kinds(tmp_path):
    model = CostModel(0.010, 0.002, 1e-6, alone=(0.8, 0.9))
    for step in [(4, 900), (300, 40000, 0, 2), (50, 2000, 0, 10, 5)]:
        assert model.step_time(*step, alone=False) == pytest.approx(
            CostModel(0.010, 0.002, 1e-6).step_time(*step))
    assert model.step_time(4, 900, alone=True) == pytest.approx(0.8 * model.step_time(4, 900))
    assert model.step_time(50, 2000, 0, 10, 5, alone=True) == pytest.approx(
        (5 * 0.8 + 45 * 0.9) / 50 * model.step_time(50, 2000, 0, 10, 5))
    model.save(tmp_path / "m.json")
    assert CostModel.load(tmp_path / "m.json").alone == (0.8, 0.9)
    with pytest.raises(ValueError, match="alone"):
        CostModel(0.010, 0.002, 1e-6, alone=(0.0, 1.0))


def counting_engine(tiny_llama_dir, **options):
    """A tiny Llama's engine whose every step appends how many requests it output."""
    from infinite_llm import LLM

    engine = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="4MiB",
                 **options).engine
    decoded = []
    step = engine.step

    def counting():
        outputs = step()
        decoded.append(len(outputs))
        return outputs

    engine.step = counting
    return engine, decoded

def test_a_decode_point_times_its_requests_beside_a_fresh_prompt_of_each_chunk(tiny_llama_dir):
    """measure(chunks=...): after the decode steps, each chunk's prompt is computed whole
    in one step beside every decode (checked by counting each step's outputs), and the
    mixed point says so: its decodes, its tokens, its pairs; nothing is left behind."""
    from infinite_llm.engine.profile import measure

    engine, decoded = counting_engine(tiny_llama_dir, max_num_batched_tokens=64)
    points = measure(engine, batch=3, context=20, steps=2, chunks=(8, 40))
    assert decoded[-4:] == [4, 4, 4, 4]  # the 3 decodes and the prompt's first token
    decode, short, long = points
    assert decode.tokens is None and decode.decoding == 3
    assert (short.batch, short.tokens, short.decoding) == (4, 11, 3)
    assert (long.batch, long.tokens, long.decoding) == (4, 43, 3)
    # The decodes' contexts as in the step, and the prompt's causal pairs.
    assert long.context_tokens - 40 * 41 // 2 > short.context_tokens - 8 * 9 // 2 >= 3 * 21
    assert engine.snapshot().pools_full and not engine.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="not computed whole"):
        measure(engine, batch=3, context=20, steps=1, chunks=(62,))
    assert engine.snapshot().pools_full and not engine.has_unfinished_requests()

def test_profile_measures_a_model_and_writes_the_fit(tiny_llama_dir, tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "profile", "--model", str(tiny_llama_dir),
         "--out", str(out), "--batches", "1", "4", "--contexts", "16", "128", "--steps", "3",
         "--prefills", "32", "200", "--prefill-prompts", "1", "3",
         "--kv-cache-memory", "8MiB", "--dtype", "float32", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    model = CostModel.load(out)
    assert [(p.batch, p.context_tokens > 0, p.step_s > 0) for p in model.points] == [
        (1, True, True), (1, True, True), (4, True, True), (4, True, True),
        (1, True, True), (1, True, True), (3, True, True), (3, True, True)]
    # The prefill steps: 1 and 3 prompts of 32 and 200 tokens, attention in pairs.
    assert [(p.tokens, p.context_tokens) for p in model.points[4:]] == [
        (32, 528), (200, 20100), (96, 1584), (600, 60300)]
    assert model.source["model"] == str(tiny_llama_dir) and model.source["dtype"] == "float32"
    assert model.step_time(4, 500) > 0
    # The engine's own share of a decode step (outside the runner): measured, and less.
    decode = sorted(p.step_s for p in model.points[:4])
    assert 0 < model.engine_s < decode[len(decode) // 2]
    assert all(0 < p.engine_s < p.step_s for p in model.points[:4])
    assert "T = " in done.stdout and "engine's own work" in done.stdout and json.loads(out.read_text())["points"]


def test_profile_in_rounds_takes_each_points_median_round(tiny_llama_dir, tmp_path):
    out = tmp_path / "p.json"
    done = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "profile", "--model", str(tiny_llama_dir),
         "--out", str(out), "--batches", "1", "2", "--contexts", "16", "64", "--steps", "2",
         "--prefills", "16", "--prefill-prompts", "1", "--rounds", "3",
         "--kv-cache-memory", "8MiB", "--dtype", "float32", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    model = CostModel.load(out)
    assert model.source["rounds"] == 3 and len(model.points) == 5
    for p in model.points:
        assert len(p.round_s) == 3 and p.step_s == sorted(p.round_s)[1]
    # The probe timed once a round: its decode and prefill seconds.
    assert len(model.source["probe_s"]) == 3
    assert all(len(p) == 2 and min(p) > 0 for p in model.source["probe_s"])
    assert "rounds ms" in done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "profile", "--model", str(tiny_llama_dir),
         "--out", str(tmp_path / "q.json"), "--rounds", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 2 and "--rounds must be positive" in refused.stderr
    assert not (tmp_path / "q.json").exists()


def test_profile_leaves_out_grid_points_its_kv_cache_cannot_hold(tiny_llama_dir, tmp_path):
    out = tmp_path / "p.json"
    done = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "profile", "--model", str(tiny_llama_dir),
         "--out", str(out), "--batches", "1", "2", "--contexts", "16", "800",
         "--steps", "2", "--prefills", "16", "--kv-cache-memory", "1MiB",
         "--dtype", "float32", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "2 requests of 800 tokens do not fit the KV cache" in done.stderr
    assert "1 requests of 800" not in done.stderr
    decode = [(p.batch, p.context_tokens // p.batch) for p in CostModel.load(out).points
              if p.tokens is None]
    assert [(b, c // 100) for b, c in decode] == [(1, 0), (1, 8), (2, 0)]


def test_profile_refuses_prefills_its_kv_cache_cannot_hold(tiny_llama_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "profile", "--model", str(tiny_llama_dir),
         "--out", str(tmp_path / "p.json"), "--batches", "1", "--contexts", "16",
         "--steps", "1", "--prefills", "200", "--prefill-prompts", "8",
         "--kv-cache-memory", "1MiB", "--dtype", "float32", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "a prefill of 8 x 200 tokens needs KV for" in done.stderr
    assert "raise --kv-cache-memory" in done.stderr and "Traceback" not in done.stderr


def test_the_fit_weighs_every_point_by_its_own_time():
    """A prefill step hundreds of times longer than a decode step, measured 30% off,
    must not pull the decode steps (most of a simulation) off their measurements."""
    truth = CostModel(0.030, 0.002, 5e-7, per_sequence_s=0.003)
    decode = [ProfilePoint(b, s, truth.step_time(b, s)) for b in (1, 4, 16) for s in (64, 2048)]
    prefill = [ProfilePoint(1, n * (n + 1) // 2, truth.step_time(n, n * (n + 1) // 2, sequences=1),
                            tokens=n) for n in (128, 512)]
    off = ProfilePoint(8, 8 * 4096 * 4097 // 2,
                       1.3 * truth.step_time(8 * 4096, 8 * 4096 * 4097 // 2, sequences=8),
                       tokens=8 * 4096)
    fit = CostModel.fit(decode + prefill + [off])
    for p in decode:
        assert fit.step_time(p.batch, p.context_tokens) == pytest.approx(p.step_s, rel=0.03)


def test_decode_steps_follow_the_measured_grid_where_a_line_cannot():
    """Where the measured decode steps bend away from the fitted line (on this machine a
    batch of 64 over 131K context tokens ran faster than over 33K), a decode step is the
    line corrected by the residuals interpolated over the grid: the grid's own points
    come back exactly, steps between them lie between."""
    measured = {(1, 64): 0.035, (1, 512): 0.037, (1, 2048): 0.039,
                (16, 64): 0.064, (16, 512): 0.102, (16, 2048): 0.126,
                (64, 64): 0.171, (64, 512): 0.243, (64, 2048): 0.155}
    points = [ProfilePoint(b, b * c, t) for (b, c), t in measured.items()]
    points += [ProfilePoint(1, 128 * 129 // 2, 0.33, tokens=128),
               ProfilePoint(8, 8 * 1024 * 1025 // 2, 1.99, tokens=8 * 1024)]
    model = CostModel.fit(points)
    for (b, c), t in measured.items():
        assert model.step_time(b, b * c) == pytest.approx(t)
    between = model.step_time(64, 64 * 1024)
    assert min(0.243, 0.155) < between < max(0.243, 0.155)
    assert model.step_time(40, 40 * 512) == pytest.approx((0.102 + 0.243) / 2, rel=0.05)
    line = CostModel(model.fixed_s, model.per_token_s, model.per_context_token_s,
                     per_sequence_s=model.per_sequence_s)  # the same line, no points
    assert line.step_time(64, 64 * 2048) != pytest.approx(0.155, rel=0.05)
    assert model.line(64, 64 * 2048) == line.step_time(64, 64 * 2048)
    # A batch whose longest contexts did not fit the profile's KV cache: its row stops
    # short, and beyond it the residual is held at its last point.
    ragged = CostModel.fit([p for p in points if (p.batch, p.context_tokens) != (64, 64 * 2048)])
    assert ragged.step_time(64, 64 * 512) == pytest.approx(0.243)
    assert ragged.step_time(64, 64 * 4096) - ragged.line(64, 64 * 4096) == (
        pytest.approx(0.243 - ragged.line(64, 64 * 512)))


def test_steps_of_prompts_follow_the_prefill_points_and_mixed_steps_the_line():
    """Many short prompts at once run faster per token than the line says here (32 of
    128 tokens: 6.2 s measured, 7.8 s on the line): a step of prompts only is the line
    times the measured ratio interpolated over prompts and tokens a prompt, exact at the
    points and scaling beyond them; a step mixing prompts and decodes keeps the line."""
    truth = CostModel(0.030, 0.002, 5e-7, per_sequence_s=0.001)
    points = [ProfilePoint(b, b * c, truth.step_time(b, b * c)) for b in (1, 16) for c in (64, 2048)]
    measured = {(1, 128): 0.30, (1, 2048): 5.0, (8, 128): 1.9, (32, 128): 6.2}
    for (k, n), t in measured.items():
        points.append(ProfilePoint(k, k * n * (n + 1) // 2, t, tokens=k * n))
    model = CostModel.fit(points)
    for (k, n), t in measured.items():
        assert model.step_time(k * n, k * n * (n + 1) // 2, sequences=k) == pytest.approx(t)
    # Twice the 32 prompts (two instances' in one forward): twice the time, near enough.
    double = model.step_time(64 * 128, 64 * 128 * 129 // 2, sequences=64)
    ratio = 6.2 / model.line(32 * 128, 32 * 128 * 129 // 2, sequences=32)
    assert double == pytest.approx(ratio * model.line(64 * 128, 64 * 128 * 129 // 2,
                                                      sequences=64))
    # A prompt beside 20 decodes: the line, whatever the points say.
    mixed = (128 + 20, 128 * 129 // 2 + 20 * 500)
    assert model.step_time(*mixed, sequences=21, decodes=20) == model.line(*mixed, sequences=21)
    # Decode steps are still the decode grid's: the prefill ratios do not touch them.
    assert model.step_time(16, 16 * 2048) == pytest.approx(truth.step_time(16, 16 * 2048))


def test_a_decode_point_times_its_whole_batch_when_prompts_take_several_steps(tiny_llama_dir):
    """4 prompts of 40 tokens at 32 tokens a step take 6 steps to prefill; the first
    requests decode meanwhile and must not finish before the timed steps."""
    from infinite_llm.engine.profile import measure

    engine, decoded = counting_engine(tiny_llama_dir, max_num_batched_tokens=32)
    point, = measure(engine, batch=4, context=40, steps=3)
    assert decoded[-3:] == [4, 4, 4]
    assert point.batch == 4 and point.context_tokens >= 4 * 40
    assert engine.snapshot().pools_full


def test_a_remote_pair_costs_what_spreading_added_to_the_measured_steps(tmp_path):
    truth = CostModel(0.010, 0.002, 1e-6)
    decode = [ProfilePoint(b, s, truth.step_time(b, s)) for b in (1, 4, 16) for s in (100, 5000)]
    assert CostModel.fit(decode).per_remote_s == 0.0  # never measured: nothing assumed
    spread = [replace(p, spread_s=p.step_s + added)
              for p, added in zip(decode, (0.030, 0.050, 0.040, 0.020, 0.060, 0.045))]
    model = CostModel.fit(spread)
    assert model.per_remote_s == pytest.approx(0.045)  # the median (upper, of an even count)
    # The line is fitted on the steps as timed before the spread, as without it.
    assert model.fixed_s == pytest.approx(CostModel.fit(decode).fixed_s)
    model.save(tmp_path / "fit.json")
    assert CostModel.load(tmp_path / "fit.json") == model
    faster = [replace(p, spread_s=p.step_s - 0.001) for p in decode]  # noise, not a gain
    assert CostModel.fit(faster).per_remote_s == 0.0


def test_rounds_keep_the_median_of_what_spreading_added_in_each():
    from infinite_llm.engine.profile import _median_of_rounds

    rounds = [ProfilePoint(4, 400, 0.30, spread_s=0.33), ProfilePoint(4, 400, 0.10, spread_s=0.15),
              ProfilePoint(4, 400, 0.20, spread_s=0.30)]
    point = _median_of_rounds(rounds)
    assert point.step_s == 0.20 and point.round_s == (0.30, 0.10, 0.20)
    assert point.spread_s == pytest.approx(0.20 + 0.05)  # added: 0.03, 0.05, 0.10


def test_a_spread_point_times_the_same_batch_with_one_request_across_two_instances(
    tiny_llama_dir,
):
    """measure(spread=True): after the plain steps, blocks of one request move to the
    other instance (a live migration) and the same batch is timed again, every
    request decoding in every timed step; nothing is left behind."""
    from infinite_llm import LLM
    from infinite_llm.engine.profile import measure

    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_memory="4MiB",
              instances=2, max_lend_fraction=1.0, block_size=4)
    engine = llm.engine
    spans = []
    step = engine.step

    def watching():
        outputs = step()
        spans.append(max(len(r.block_table.owners()) for r in engine.cluster.requests.values()))
        return outputs

    engine.step = watching
    point, = measure(engine, batch=4, context=40, steps=3, spread=True)
    assert point.spread_s is not None and point.spread_s > 0
    assert max(spans) == 2 and spans[-3:] == [2, 2, 2]  # the timed steps ran across
    assert engine.snapshot().pools_full and engine.cluster.ledger().total_debt == 0


def test_calibrate_runs_a_trace_for_real_and_simulated_with_the_probe(tiny_llama_dir, tmp_path):
    """benchmarks/calibrate.py end to end on a tiny model: the profile's probe and decode
    points timed again beside the runs, each metric measured and simulated (raw, at the
    probe's speed and at the points'), each real step priced."""
    from pathlib import Path

    profile = tmp_path / "cost.json"
    done = subprocess.run(
        [sys.executable, "-m", "infinite_llm.cli", "profile", "--model", str(tiny_llama_dir),
         "--out", str(profile), "--batches", "1", "4", "--contexts", "16", "64", "--steps", "2",
         "--prefills", "32", "128", "--prefill-prompts", "1", "2", "--rounds", "2",
         "--kv-cache-memory", "64MiB", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "the probe" in done.stdout and len(CostModel.load(profile).source["probe_s"]) == 2
    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(
        f"{0.05 * i},{20 + 7 * i},{4 + i % 3}\n" for i in range(8)))
    out = tmp_path / "cal.json"
    script = Path(__file__).parents[1] / "benchmarks" / "calibrate.py"
    done = subprocess.run(
        [sys.executable, str(script), "--model", str(tiny_llama_dir), "--cost-model", str(profile),
         "--workload", "trace", "--trace", str(trace), "--num-prompts", "8", "--instances", "2",
         "--tokens-each", "4096", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "probe: decode steps" in done.stdout and "at the probe's speed" in done.stdout
    result = json.loads(out.read_text())
    assert len(result["measured"]) == 2 and len(result["speed"]) == 2
    assert all(s > 0 for s in result["speed"])
    # The decode points timed beside the runs, on the machine just profiled: near their
    # price; steps of prompts at the probe's speed.
    assert 0.25 < result["points_speed"][0] < 4 and result["points_speed"][1] == result["speed"][1]
    assert "at the points' speed" in done.stdout
    for key in ("duration", "mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms"):
        assert result["simulated"][key] > 0 and result["simulated_at_speed"][key] > 0
        assert result["simulated_at_points_speed"][key] > 0
    assert "decode" in done.stdout  # each real step priced, by kind
