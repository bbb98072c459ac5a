"""Evaluation jobs: JSONL lines, resume (also after SIGKILL), repair, policies, failures, summary, report."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from rollout import EvalError, PolicyFailed, episode_seed, evaluate
from rollout.eval import Progress
from rollout.results import EpisodeLine, Header, ResultsFile, parse, read
from rollout.summary import Z95, summarize

POLICIES = '''
import asyncio
calls = 0

def last_legal(obs):
    return obs.legal_actions[-1]

async def first_legal(obs):
    await asyncio.sleep(0)
    return obs.legal_actions[0]

def flaky(obs):
    global calls
    calls += 1
    if calls > 120:
        raise ZeroDivisionError("policy bug")
    return obs.legal_actions[0]

def illegal(obs):
    return 99
'''

FAST: dict[str, Any] = {"n": 4, "servers": 1, "game": "tic_tac_toe", "progress": None}


@pytest.fixture
def policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``evalpolicies_<random>`` of test policies, importable through sys.path."""
    name = f"evalpolicies_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(POLICIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def results(path: Path) -> dict[int, tuple[int, float, int, str | None]]:
    """Episode -> (seed, return, length, outcome); asserts each episode is in the file once."""
    contents = read(path)
    assert contents.dropped == 0
    indices = [line.episode for line in contents.episodes]
    assert len(indices) == len(set(indices))
    return {line.episode: (line.seed, line.ret, line.length, line.outcome) for line in contents.episodes}


def envserver_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``EVAL_TEST_TAG=tag``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"EVAL_TEST_TAG={tag}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().split(")")[-1].split()[0] != "Z":
                    found.append(int(entry))
        except OSError:
            continue
    return found


def rollout_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rollout.cli", *args], capture_output=True, text=True, timeout=120, **kwargs)


async def test_one_json_line_per_episode_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ttt.jsonl"
    stream = io.StringIO()
    summary = await evaluate("random", 40, out=str(out), seed=3, **{**FAST, "progress": stream})
    raw = out.read_text().splitlines()
    header = json.loads(raw[0])
    assert header["envfleet_eval"] == 1 and header["env"] == "openspiel" and header["options"] == {"game": "tic_tac_toe"}
    assert header["seed"] == 3 and header["policy"] == "random" and header["episodes"] == 40
    lines = [json.loads(line) for line in raw[1:]]
    assert sorted(d["episode"] for d in lines) == list(range(40))
    for d in lines:
        assert set(d) == {"episode", "seed", "return", "length", "outcome", "wall_time", "server", "time"}
        assert d["seed"] == episode_seed(3, d["episode"])
        assert d["outcome"] == {1.0: "win", 0.0: "draw", -1.0: "loss"}[d["return"]]
        assert d["length"] >= 3 and d["wall_time"] > 0 and d["server"].startswith("http://127.0.0.1:")
    assert summary.episodes == 40 and summary.played == 40 and summary.resumed == 0 and summary.outcomes == 40
    assert summary.mean_return == pytest.approx(sum(d["return"] for d in lines) / 40)
    assert summary.win_rate is not None and summary.draw_rate is not None and summary.loss_rate is not None
    assert summary.win_rate + summary.draw_rate + summary.loss_rate == pytest.approx(1.0)
    assert summary.episodes_per_s and summary.episodes_per_s > 0
    assert "eval: 40/40 episodes (100.0%)" in stream.getvalue()

    # a finished file: nothing to play, no pool started, the same summary
    again = await evaluate("random", 40, out=str(out), seed=3, **FAST)
    assert again.played == 0 and again.resumed == 40 and again.mean_return == summary.mean_return
    assert out.read_text().splitlines() == raw


async def test_resume_skips_recorded_episodes_and_repairs_a_half_written_line(tmp_path: Path) -> None:
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    await evaluate("random", 60, out=str(whole), **FAST)
    first = await evaluate("random", 25, out=str(part), **FAST)
    assert first.played == 25
    half = b'{"episode":59,"seed":12,"ret'
    with open(part, "ab") as f:  # a job killed mid-write
        f.write(half)
    resumed = await evaluate("random", 60, out=str(part), **FAST)
    assert resumed.resumed == 25 and resumed.played == 35 and resumed.truncated_bytes == len(half)
    assert results(part) == results(whole)  # every episode once, the same as an uninterrupted run


async def test_refuses_another_jobs_file_and_a_corrupt_middle_line(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    header = Header(env="openspiel", options={"game": "catch"}, seed=0, policy="random", episodes=10)
    lines = [EpisodeLine(episode=i, seed=i, ret=1.0, length=10) for i in range(3)]
    writer = ResultsFile.open(out, header)
    for line in lines:
        writer.append(line)
    with pytest.raises(EvalError, match="being written by another job"):
        ResultsFile.open(out, header)
    await writer.close()
    for policy, seed, game, what in [
        ("random", 1, "catch", "seed 0 in the file, 1 now"),
        ("random", 0, "tic_tac_toe", "options"),
        ("first-legal", 0, "catch", "policy"),
    ]:
        with pytest.raises(EvalError, match=what):
            await evaluate(policy, 10, out=str(out), seed=seed, game=game, n=1, servers=1, progress=None)
    data = out.read_bytes()
    assert parse(data, "x").episodes == lines
    middle = data.replace(b'"episode":1,', b'"episode":1,,')
    out.write_bytes(middle)
    with pytest.raises(EvalError, match="line 3 is corrupt"):
        await evaluate("random", 10, out=str(out), game="catch", n=1, servers=1, progress=None)
    assert out.read_bytes() == middle  # untouched
    assert parse(data + b"\0\0\0\0\n", "x").dropped == 5  # a complete but garbage last line (NULs after a crash)
    with pytest.raises(EvalError, match="not an envfleet eval file"):
        parse(b'{"episode": 0}\n', "x")


async def test_custom_policies_sync_and_async(policies: str, tmp_path: Path) -> None:
    sync = await evaluate(f"{policies}:last_legal", 12, out=str(tmp_path / "last.jsonl"), **FAST)
    assert sync.policy == f"{policies}:last_legal" and sync.episodes == 12
    await evaluate(f"{policies}:first_legal", 12, out=str(tmp_path / "async.jsonl"), **FAST)
    await evaluate("first-legal", 12, out=str(tmp_path / "builtin.jsonl"), **FAST)
    assert results(tmp_path / "async.jsonl") == results(tmp_path / "builtin.jsonl")
    with pytest.raises(EvalError, match="cannot load policy"):
        await evaluate(f"{policies}:nothing", 1, out=str(tmp_path / "x.jsonl"), **FAST)
    with pytest.raises(EvalError, match="unknown policy"):
        await evaluate("smart", 1, out=str(tmp_path / "y.jsonl"), **FAST)


@pytest.mark.parametrize(
    ("policy", "message"),
    [("flaky", r"raised ZeroDivisionError: policy bug in episode \d+"), ("illegal", r"chose an illegal action in episode \d+")],
)
async def test_a_failing_policy_stops_the_job_and_keeps_the_file_valid(policies: str, tmp_path: Path, policy: str, message: str) -> None:
    out = tmp_path / "fail.jsonl"
    tag = uuid.uuid4().hex
    os.environ["EVAL_TEST_TAG"] = tag  # inherited by the local servers
    try:
        with pytest.raises(PolicyFailed, match=message) as caught:
            await evaluate(f"{policies}:{policy}", 200, out=str(out), **FAST)
    finally:
        del os.environ["EVAL_TEST_TAG"]
    assert caught.value.episode is not None and "re-run to resume" in str(caught.value)
    written = results(out)  # parses, nothing half-written
    assert caught.value.episode not in written
    if policy == "flaky":
        assert len(written) >= 1
    assert envserver_processes(tag) == []  # the pool's servers are gone


def test_sigkill_mid_run_then_resume_plays_every_episode_once(tmp_path: Path) -> None:
    out = tmp_path / "killed.jsonl"
    tag = uuid.uuid4().hex
    args = [sys.executable, "-m", "rollout.cli", "eval", "--game", "tic_tac_toe", "--episodes", "1500", "--n", "8", "--servers", "1",
            "--seed", "7", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "EVAL_TEST_TAG": tag}
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        deadline = time.monotonic() + 60
        while not out.exists() or out.read_bytes().count(b"\n") < 100:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    recorded = read(out)
    assert 0 < len(recorded.episodes) < 1500
    deadline = time.monotonic() + 15  # orphaned local servers exit when their stdin closes
    while envserver_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert envserver_processes(tag) == []

    resumed = subprocess.run(args + ["--summary-json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] == len(recorded.episodes) and summary["played"] == 1500 - len(recorded.episodes)
    whole = tmp_path / "whole.jsonl"
    reference = rollout_cli(*args[3:-1], str(whole))
    assert reference.returncode == 0, reference.stderr
    assert results(out) == results(whole)


def test_summary_math_on_known_data() -> None:
    header = Header(env="openspiel", options={}, seed=0, policy="random", episodes=5)
    outcomes: list[Any] = ["win", "win", "draw", "loss", None]
    lines = [EpisodeLine(episode=i, seed=i, ret=float(r), length=n, outcome=o) for i, (r, n, o) in enumerate(zip([1, 2, 3, 4, 5], [3, 1, 2, 5, 4], outcomes))]
    s = summarize(lines, header, "x")
    half = Z95 * math.sqrt(2.5) / math.sqrt(5)  # sample variance of 1..5 is 2.5
    assert s.mean_return == 3.0 and s.std_return == pytest.approx(math.sqrt(2.5))
    assert (s.ci95_low, s.ci95_high) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    assert half == pytest.approx(1.3859, abs=1e-4)
    assert (s.outcomes, s.win_rate, s.draw_rate, s.loss_rate) == (4, 0.5, 0.25, 0.25)
    assert (s.length_min, s.length_p50, s.length_max, s.length_mean) == (1, 3, 5, 3.0)
    one = summarize(lines[:1], header, "x")
    assert one.mean_return == 1.0 and one.ci95_low is None and one.std_return is None
    none = summarize([], header, "x")
    assert none.mean_return is None and none.win_rate is None and none.length_min is None
    catch = summarize([EpisodeLine(episode=0, seed=0, ret=-1.0, length=10)], header, "x")
    assert catch.outcomes == 0 and catch.win_rate is None


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = Progress(Tty(), total=200, done=50)
    bar.started -= 2.0
    bar.done = 150
    line = bar.line()
    assert line.startswith("\r[") and "150/200" in line and "75.0%" in line and "ETA 0:01" in line and "episodes/s" in line
    plain = Progress(io.StringIO(), total=200, done=0).line()
    assert plain.startswith("eval: 0/200 episodes (0.0%)") and plain.endswith("\n")


def test_cli_eval_with_a_module_policy_then_report_and_plot(policies: str, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "catch.jsonl"
    run = rollout_cli("eval", "--policy", f"{policies}:last_legal", "--episodes", "30", "--n", "4", "--servers", "1",
                      "--out", str(out), "--summary-json", "-", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["episodes"] == 30 and summary["policy"] == f"{policies}:last_legal" and summary["outcomes"] == 0
    assert "eval: 30/30 episodes" in run.stderr

    report = rollout_cli("report", str(out), "--json")
    assert report.returncode == 0, report.stderr
    same = json.loads(report.stdout)
    assert {k: same[k] for k in ("episodes", "mean_return", "ci95_low", "length_p50")} == {
        k: summary[k] for k in ("episodes", "mean_return", "ci95_low", "length_p50")
    }
    text = rollout_cli("report", str(out))
    assert "30 episodes of openspiel catch" in text.stdout and "95% CI" in text.stdout and "length: min" in text.stdout

    missing = rollout_cli("report", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "no such results file" in missing.stderr and "Traceback" not in missing.stderr

    if not os.environ.get("CI"):
        pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    plotted = rollout_cli("report", str(out), "--plot", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


async def test_a_fleet_that_cannot_replace_a_server_is_not_blamed_on_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rollout import FleetError

    killed: list[int] = []

    def policy(observation: Any) -> int:
        if not killed:  # kill the only server, and make every new one fail to start (Python cannot find its home)
            monkeypatch.setenv("PYTHONHOME", str(tmp_path / "nowhere"))
            for pid in _envserver_children():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return observation.legal_actions[0]

    out = str(tmp_path / "e.jsonl")
    async with asyncio.timeout(40):
        with pytest.raises(FleetError, match="cannot replace"):
            await evaluate(policy, 20, out=out, n=2, servers=1, game="catch", progress=None, start_timeout=6.0)
    assert killed


def _envserver_children() -> list[int]:
    """The envserver processes this test process started."""
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[1] == me and b"envserver" in cmdline and fields[0] != "Z":
            found.append(int(name))
    return found
