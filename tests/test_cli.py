"""The command line: bad input → one-line error, exit code 2, no traceback; a real render works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from slotgen.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

GOOD = """\
duration: 1s
resolution: 32x32
prompts:
  - prompt: a red circle moves left on a blue background
"""

BAD_CASES = {
    "unknown key": ("fsp: 16\n" + GOOD, 1, "unknown key 'fsp'"),
    "wrong type": ("fps: abc\n" + GOOD, 1, "fps: expected an integer"),
    "unordered": (
        "duration: 4\nprompts:\n  - at: 0\n    prompt: a red circle\n  - at: 3\n    prompt: a blue star\n"
        "  - at: 2\n    prompt: a green square\n",
        7,
        "",
    ),
    "gap": (
        "duration: 4\nprompts:\n  - at: 0\n    until: 1\n    prompt: a red circle\n  - at: 2\n    prompt: a blue star\n",
        6,
        "no prompt covers",
    ),
    "negative duration": ("duration: -3\nprompts:\n  - prompt: a red circle\n", 1, "duration"),
    "bad resolution": ("resolution: 50x64\n" + GOOD.replace("resolution: 32x32\n", ""), 1, "divisible by 16"),
    "empty prompt": ("duration: 1\nprompts:\n  - prompt: '  '\n", 3, "prompt"),
    "not a mapping": ("- just\n- a list\n", 1, "mapping"),
    "bad yaml": ("duration: 1\nprompts: [\n", 3, ""),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_storyboard_mistakes_exit_2_with_line(tmp_path, name):
    text, line, needle = BAD_CASES[name]
    path = tmp_path / "story.yaml"
    path.write_text(text)
    res = runner.invoke(app, ["render", str(path), "-o", str(tmp_path / "o.mp4"), "--quiet"])
    assert res.exit_code == 2, res.output
    out = res.stderr if hasattr(res, "stderr") else res.output
    first = out.strip().splitlines()[0]
    assert first.startswith(f"error: {path}:{line}: "), out
    assert needle in out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "o.mp4").exists()


def test_missing_file_and_bad_options(tmp_path):
    res = runner.invoke(app, ["render", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "not found" in res.output and "Traceback" not in res.output
    story = tmp_path / "s.yaml"
    story.write_text(GOOD)
    for args, needle in [
        (["--memory", "bogus"], "unknown policy 'bogus'"),
        (["--memory", "window", "--sink", "2"], "--sink does not apply"),
        (["--window", "0"], "--window"),
        (["-o", str(tmp_path / "x.avi")], ".avi"),
        (["-o", str(tmp_path / "no" / "dir" / "x.mp4")], "does not exist"),
        (["--model", "Wan-AI/Wan2.1-T2V-1.3B"], "never downloads"),
    ]:
        res = runner.invoke(app, ["render", str(story), "--quiet", *args])
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output, (args, res.output)
        assert "Traceback" not in res.output


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_cli_never_tracebacks_on_garbage(tmp_path, text):
    path = tmp_path / "g.yaml"
    path.write_text(text, encoding="utf-8")
    # render of any garbage: either a clean exit-2 error or (if it happens to be valid) we stop early
    from slotgen.storyboard import parse_storyboard
    from slotgen.errors import StoryboardError

    try:
        parse_storyboard(text, str(path))
    except StoryboardError:
        res = runner.invoke(app, ["render", str(path), "-o", str(tmp_path / "g.mp4"), "--quiet"])
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert res.output.startswith(f"error: {path}")


@pytest.mark.slow
def test_render_demo_subprocess(tmp_path):
    """The README's command, as a user runs it: a real MP4 and a clean exit."""
    out = tmp_path / "demo.mp4"
    story = tmp_path / "short.yaml"
    story.write_text(GOOD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "slotgen", "render", str(story), "-o", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "wrote" in proc.stderr and "Traceback" not in proc.stderr
    from slotgen.video.writer import probe_video

    assert probe_video(out)["frames"] == 16


def test_cpu_thread_default_leaves_a_core_to_the_overlapped_decode():
    from slotgen.errors import SlotgenError
    from slotgen.preflight import cpu_threads

    assert cpu_threads(None, usable_cores=2, torch_default=2, env={}) == 1
    assert cpu_threads(None, usable_cores=8, torch_default=8, env={}) == 7
    assert cpu_threads(None, usable_cores=16, torch_default=8, env={}) == 8  # never above torch's own default
    assert cpu_threads(None, usable_cores=1, torch_default=1, env={}) == 1
    assert cpu_threads(None, usable_cores=8, torch_default=8, env={"OMP_NUM_THREADS": "3"}) is None  # the user's
    assert cpu_threads(5, usable_cores=2, torch_default=2, env={"OMP_NUM_THREADS": "3"}) == 5  # --threads wins
    with pytest.raises(SlotgenError):
        cpu_threads(0)


@pytest.mark.slow
def test_render_threads_option_sets_torch_threads(tmp_path):
    import torch

    story = tmp_path / "short.yaml"
    story.write_text(GOOD)
    before = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["render", str(story), "-o", str(tmp_path / "t.mp4"), "-q", "--threads", "2"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    bad = CliRunner().invoke(app, ["render", str(story), "-o", str(tmp_path / "t.mp4"), "--threads", "0"])
    assert bad.exit_code == 2


def test_demo_storyboard_is_valid():
    from slotgen.storyboard import load_storyboard

    sb = load_storyboard(ROOT / "storyboards" / "demo.yaml")
    assert len(sb.prompts) >= 2 and sb.model == "miniature"
