"""Storyboard loading and validation: values, line-numbered errors, timeline queries, round trips."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slotgen.errors import StoryboardError
from slotgen.memory import SinkConfig, WindowConfig, default_memory, parse_memory_config, policy_names
from slotgen.storyboard import (
    PromptSpan,
    SamplerConfig,
    Storyboard,
    load_storyboard,
    parse_storyboard,
)
from slotgen.timeparse import parse_time

REPO = Path(__file__).resolve().parent.parent
PATH = "story.yaml"


def parse(text: str) -> Storyboard:
    return parse_storyboard(textwrap.dedent(text), PATH)


def error_of(text: str) -> StoryboardError:
    with pytest.raises(StoryboardError) as info:
        parse(text)
    return info.value


def assert_error(text: str, line: int | None, *fragments: str) -> StoryboardError:
    """The text fails with ``story.yaml:LINE: `` and a message containing every fragment."""
    err = error_of(text)
    where = f"{PATH}:{line}: " if line is not None else f"{PATH}: "
    assert str(err).startswith(where), str(err)
    assert err.line == line
    for fragment in fragments:
        assert fragment in str(err), str(err)
    assert len(str(err).splitlines()) == 1
    return err


def spans(storyboard: Storyboard) -> list[tuple[float, float, str]]:
    return [(p.start, p.end, p.text) for p in storyboard.prompts]


# --------------------------------------------------------------------------------------------------
# Valid storyboards


FULL = """\
title: Shapes
duration: 8s
fps: 24
resolution: "128x64"
seed: 42
model: ./checkpoints/wan
sampler:
  steps: 4
  shift: 5.0
memory:
  policy: window
  window: 6
prompts:
  - prompt: a red circle moves left on a blue background
    until: 3s
  - at: 3
    prompt: a green square enters from the right
    duration: 2.5s
  - at: "0:05.5"
    prompt: a yellow star moves up
"""


def test_full_storyboard_values():
    sb = parse(FULL)
    assert sb.title == "Shapes"
    assert sb.duration == 8.0
    assert sb.fps == 24
    assert sb.resolution == (128, 64)
    assert sb.seed == 42
    assert sb.model == "./checkpoints/wan"
    assert sb.sampler == SamplerConfig(steps=4, shift=5.0)
    assert sb.memory == WindowConfig(policy="window", window=6)
    assert spans(sb) == [
        (0.0, 3.0, "a red circle moves left on a blue background"),
        (3.0, 5.5, "a green square enters from the right"),
        (5.5, 8.0, "a yellow star moves up"),
    ]
    assert sb.total_frames == 192
    assert sb.source_path == PATH


def test_defaults_and_derived_duration():
    sb = parse(
        """\
        prompts:
          - prompt: a red circle stays
            duration: 2
        """
    )
    assert sb.title is None
    assert sb.duration == 2.0
    assert sb.fps == 16
    assert sb.resolution is None
    assert sb.seed == 0
    assert sb.model == "miniature"
    assert sb.sampler is None
    assert sb.memory == default_memory() == SinkConfig(policy="sink", sink=3, window=9)
    assert spans(sb) == [(0.0, 2.0, "a red circle stays")]
    assert sb.total_frames == 32


def test_duration_derived_from_last_until():
    sb = parse(
        """\
        prompts:
          - prompt: a
          - at: 2
            prompt: b
            until: 1m
        """
    )
    assert sb.duration == 60.0
    assert spans(sb) == [(0.0, 2.0, "a"), (2.0, 60.0, "b")]


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("3", 3.0),
        ("2.5", 2.5),
        ('"12.5s"', 12.5),
        ('"12.5"', 12.5),
        ("12.5s", 12.5),
        ("1m30s", 90.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ('"1:30"', 90.0),
        ("1:30", 90.0),  # YAML 1.1 reads this as the base-60 integer 90
        ('"0:01:30.5"', 90.5),
        ("0:01:30.5", 90.5),
    ],
)
def test_time_forms(written, seconds):
    sb = parse(
        f"""\
        duration: 4000
        prompts:
          - prompt: a
          - at: {written}
            prompt: b
        """
    )
    assert sb.prompts[1].start == seconds


@pytest.mark.parametrize("bad", ["abc", "1:75", "1:60:00", "5 minutes", "", "s", "1.2.3s", True, None, [1]])
def test_parse_time_rejects(bad):
    with pytest.raises(ValueError, match="expected a"):
        parse_time(bad)


def test_parse_time_negative():
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_time("-3s")


def test_implicit_ends_run_to_next_prompt_and_to_duration():
    sb = parse(
        """\
        duration: 10
        prompts:
          - at: 0
            prompt: a
          - at: 4
            prompt: b
          - at: 7
            prompt: c
        """
    )
    assert spans(sb) == [(0.0, 4.0, "a"), (4.0, 7.0, "b"), (7.0, 10.0, "c")]


def test_float_rounding_at_boundaries_is_absorbed():
    sb = parse(
        """\
        prompts:
          - prompt: a
            duration: 0.1
          - at: 0.1
            prompt: b
            duration: 0.2
          - at: 0.3
            prompt: c
            until: 0.6
        """
    )
    assert [p.start for p in sb.prompts] == [0.0, 0.1, 0.3]
    assert sb.prompts[1].end == 0.3 and sb.duration == 0.6


def test_resolution_list_form_and_text_fields():
    sb = parse(
        """\
        title: 1984
        resolution: [32, 48]
        prompts:
          - prompt: yes
            duration: 1
        """
    )
    assert sb.resolution == (32, 48)
    assert sb.title == "1984"
    assert sb.prompts[0].text == "yes"


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("memory:\n  policy: window\n", WindowConfig(policy="window", window=12)),
        ("memory:\n  policy: sink\n", SinkConfig(policy="sink", sink=3, window=9)),
        ("memory:\n  policy: sink\n  sink: 0\n  window: 4\n", SinkConfig(policy="sink", sink=0, window=4)),
        ("", default_memory()),
    ],
)
def test_memory_defaults_per_policy(block, expected):
    sb = parse_storyboard(block + "prompts: [{prompt: a, duration: 1}]\n", PATH)
    assert sb.memory == expected


def test_parse_memory_config_for_cli():
    assert parse_memory_config({"policy": "window", "window": "8"}) == WindowConfig(policy="window", window=8)
    assert policy_names() == ("window", "sink", "bank", "slot")
    with pytest.raises(Exception, match="window"):
        parse_memory_config({"policy": "frames"})


def test_demo_storyboard_loads():
    from slotgen.world.grammar import unknown_words

    sb = load_storyboard(REPO / "storyboards" / "demo.yaml")
    assert sb.duration == 8.0 and sb.fps == 16 and sb.resolution == (64, 64)
    assert sb.model == "miniature" and sb.memory.policy == "slot" and sb.title
    assert [(p.start, p.end) for p in sb.prompts] == [(0.0, 1.3), (1.3, 2.0), (2.0, 2.8), (2.8, 3.5), (3.5, 5.0),
                                                      (5.0, 5.8), (5.8, 8.0)]
    for prompt in sb.prompts:  # every word is one the miniature was trained on
        assert unknown_words(prompt.text) == [], prompt.text


# --------------------------------------------------------------------------------------------------
# Errors, with exact line numbers


def test_unordered_prompt_times():
    assert_error(
        """\
        title: t
        duration: 8
        prompts:
          - prompt: a
            until: 6s
          - prompt: b
            at: 4s
        """,
        7,
        "prompts[1].at: prompt times must be in order; 4s starts before the previous prompt ends at 6s",
    )


def test_prompt_not_after_previous_start():
    assert_error(
        """\
        duration: 8
        prompts:
          - prompt: a
          - at: 5
            prompt: b
          - at: 3
            prompt: c
        """,
        6,
        "prompts[2].at: prompt times must be in order; 3s is not after the previous prompt's start at 5s",
    )


def test_gap_between_prompts():
    assert_error(
        """\
        duration: 10
        prompts:
          - prompt: a
            until: 6
          - prompt: b
            at: 8
        """,
        6,
        "prompts[1].at: no prompt covers 6s–8s",
    )


def test_first_prompt_must_start_at_zero():
    assert_error(
        """\
        duration: 4
        prompts:
          - prompt: a
            at: 1s
        """,
        4,
        "prompts[0].at: the first prompt must start at 0s, not 1s",
    )


def test_later_prompt_needs_at():
    assert_error(
        """\
        duration: 4
        prompts:
          - prompt: a
          - prompt: b
        """,
        4,
        "prompts[1]: missing required key 'at'",
    )


def test_last_prompt_ends_before_duration():
    assert_error(
        """\
        duration: 8
        prompts:
          - prompt: a
            until: 6
        """,
        4,
        "prompts[0].until: no prompt covers 6s–8s",
    )


def test_last_prompt_ends_after_duration():
    assert_error(
        """\
        duration: 8
        prompts:
          - prompt: a
          - at: 5
            prompt: b
            duration: 4
        """,
        6,
        "prompts[1].duration: the last prompt ends at 9s, after the storyboard ends at 8s",
    )


def test_last_prompt_starts_after_duration():
    assert_error(
        """\
        duration: 8
        prompts:
          - prompt: a
          - at: 9
            prompt: b
        """,
        4,
        "prompts[1].at: the last prompt starts at 9s, but the storyboard ends at 8s",
    )


def test_no_duration_anywhere():
    assert_error(
        """\
        fps: 16
        prompts:
          - prompt: a
        """,
        2,
        "prompts: cannot tell how long the storyboard is",
    )


@pytest.mark.parametrize(
    ("item", "line", "fragment"),
    [
        ("  - prompt: a\n    duration: 0\n", 4, "prompts[0].duration: must be longer than 0s"),
        ("  - prompt: a\n    until: 0\n", 4, "prompts[0].until: the prompt must end after it starts"),
        ("  - prompt: a\n    until: 2\n    duration: 2\n", 5, "give either 'until' or 'duration', not both"),
        ("  - prompt: a\n  - at: 0\n    prompt: b\n", 4, "prompts[1].at: prompt times must be in order"),
        ("  - prompt: '  '\n", 3, "prompts[0].prompt: must not be empty"),
        ("  - at: 0\n", 3, "prompts[0]: missing required key 'prompt'"),
        ("  - just text\n", 3, "prompts[0]: expected a mapping"),
        ("  - prompt: a\n    at: -1\n", 4, "prompts[0].at: times cannot be negative"),
    ],
)
def test_prompt_item_errors(item, line, fragment):
    assert_error("duration: 8\nprompts:\n" + item, line, fragment)


def test_zero_and_huge_duration():
    assert_error("prompts: [{prompt: a}]\nduration: 0\n", 2, "duration: must be longer than 0s")
    assert_error("prompts: [{prompt: a}]\nduration: 100000h\n", 2, "duration: must be at most 86400s")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ten", "expected a time: a number of seconds like 12.5, or \"12.5s\", \"1m30s\", \"2m\", \"1:30\""),
        ("-5", "duration: times cannot be negative, got -5"),
        ("-5s", "times cannot be negative"),
        ("1:99", "expected a time"),
        (".inf", "expected a finite time"),
        ("[1]", "expected a time"),
    ],
)
def test_bad_time_values(value, fragment):
    assert_error(f"title: x\nduration: {value}\nprompts: [{{prompt: a}}]\n", 2, fragment)


def test_unknown_key_with_suggestion():
    err = assert_error(
        """\
        title: x
        duration: 4
        fsp: 16
        prompts: [{prompt: a}]
        """,
        3,
    )
    assert str(err) == (
        "story.yaml:3: unknown key 'fsp'; expected one of: title, duration, fps, resolution, seed, "
        "model, sampler, memory, prompts (did you mean 'fps'?)"
    )


def test_unknown_nested_keys():
    assert_error(
        "duration: 4\nprompts:\n  - prompt: a\n    untill: 4\n",
        4,
        "prompts[0]: unknown key 'untill'; expected one of: prompt, at, until, duration, transition, blend (did you mean 'until'?)",
    )
    assert_error(
        "duration: 4\nmemory:\n  policy: sink\n  windw: 3\nprompts: [{prompt: a}]\n",
        4,
        "memory: unknown key 'windw'; expected one of: policy, preset, sink, window (did you mean 'window'?)",
    )
    assert_error(
        "duration: 4\nsampler:\n  step: 3\nprompts: [{prompt: a}]\n",
        3,
        "sampler: unknown key 'step'; expected one of: steps, shift (did you mean 'steps'?)",
    )


def test_misspelt_required_key_is_reported_instead_of_missing():
    assert_error("duration: 4\npromts:\n  - prompt: a\n", 2, "unknown key 'promts'", "did you mean 'prompts'?")


@pytest.mark.parametrize(
    ("line_text", "fragment"),
    [
        ("fps: abc", "fps: expected an integer, got 'abc'"),
        ("fps: 16.5", "fps: expected an integer, got 16.5"),
        ("fps: true", "fps: expected an integer, got true"),
        ("fps: 0", "fps: must be at least 1, got 0"),
        ("fps: 121", "fps: must be at most 120, got 121"),
        ("fps:", "fps: expected an integer, got nothing"),
        ("seed: -1", "seed: must be at least 0, got -1"),
        ("seed: 1.5", "seed: expected an integer"),
        ("title: [a, b]", "title: expected text, got a list"),
        ("model: ''", "model: must not be empty"),
        ("resolution: 64", "resolution: expected WIDTHxHEIGHT like \"64x64\" or a list [width, height], got '64'"),
        ("resolution: 64x0", "resolution: width and height must be positive, got 64x0"),
        ("resolution: [64, 64, 3]", "resolution: expected WIDTHxHEIGHT"),
        ("resolution: big", "resolution: expected WIDTHxHEIGHT"),
        ("sampler: {steps: 0}", "sampler.steps: must be at least 1, got 0"),
        ("sampler: {steps: 51}", "sampler.steps: must be at most 50, got 51"),
        ("sampler: {shift: 0}", "sampler.shift: must be greater than 0, got 0"),
        ("sampler: {shift: .nan}", "sampler.shift: expected a finite number"),
        ("sampler: 4", "sampler: expected a mapping"),
        ("memory: {policy: bnk}", "memory.policy: unknown memory policy 'bnk'; expected one of: window, sink"),
        ("memory: {policy: windo}", "(did you mean 'window'?)"),
        ("memory: {window: 3}", "memory: missing required key 'policy'; expected one of: window, sink"),
        ("memory: {polcy: sink}", "memory: unknown key 'polcy'; expected one of: policy, preset, window, sink"),
        ("memory: {policy: window, window: 0}", "memory.window: must be at least 1, got 0"),
        ("memory: {policy: sink, sink: -1}", "memory.sink: must be at least 0, got -1"),
        ("memory: {policy: sink, window: x}", "memory.window: expected an integer, got 'x'"),
        ("memory: {policy: window, sink: 2}", "memory: unknown key 'sink'; expected one of: policy, preset, window"),
        ("memory: sink", "memory: expected a mapping"),
        ("prompts: {}", "prompts: expected a list of prompts, got a mapping"),
        ("prompts: []", "prompts: must list at least one prompt"),
    ],
)
def test_wrong_values_point_at_their_line(line_text, fragment):
    # The faulty line is line 3; prompts come last unless the line replaces them.
    tail = "" if line_text.startswith("prompts") else "prompts:\n  - prompt: a\n"
    assert_error(f"# header\nduration: 4\n{line_text}\n{tail}", 3, fragment)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("title: x\nprompts: [\n", 3, "invalid YAML: "),
        ("title: x\nfps: 16: 3\n", 2, "invalid YAML: mapping values are not allowed here"),
        ("title: x\nfps:\t16\n", 2, "invalid YAML: "),
        ("a:\n  b: c\n d: e\n", 3, "check the indentation"),
        ("title: x\n\x00\n", 2, "control character U+0000"),
        ("title: a\n---\ntitle: b\n", 2, "expected a single document"),
        ("", 1, "the storyboard is empty"),
        ("# only a comment\n", 1, "the storyboard is empty"),
        ("\n\n- prompt: a\n", 3, "the top level must be a mapping of keys such as 'duration' and 'prompts', got a list"),
        ("just words\n", 1, "the top level must be a mapping"),
        ("title: x\nfps: 16\nfps: 24\n", 3, "duplicate key 'fps' (already given on line 2)"),
        ("prompts:\n  - prompt: a\n    at: 0\n    at: 1\n", 4, "prompts[0]: duplicate key 'at' (already given on line 3)"),
        ("base: &b 3\nfps: *b\n", 2, "YAML aliases (*name) are not supported"),
        ("title: x\nfps: !!python/object:os.system 3\n", 2, "fps: YAML tag '!!python/object:os.system' is not supported"),
        ("title: !custom x\n", 1, "title: YAML tag '!custom' is not supported"),
        ("title: x\nseed: !!binary aGk=\n", 2, "YAML tag '!!binary' is not supported"),
        ("title: x\n<<: {fps: 3}\n", 2, "YAML merge keys ('<<') are not supported"),
        ("title: x\n? [a, b]\n: 1\n", 2, "keys must be plain names"),
        ("title: x\nfps: !!int abc\n", 2, "fps: cannot read 'abc' as '!!int'"),
        ("title: x\nx: " + "[" * 40 + "]" * 40 + "\n", 2, "nested too deeply"),
    ],
)
def test_yaml_problems(text, line, fragment):
    err = assert_error(text, line, fragment)
    assert err.message.strip() == err.message


def test_deeply_nested_yaml_is_a_storyboard_error():
    with pytest.raises(StoryboardError):
        parse_storyboard("a: " + "[" * 5000 + "]" * 5000, PATH)


# --------------------------------------------------------------------------------------------------
# Files


def test_load_storyboard_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(StoryboardError, match=r"nope\.yaml: storyboard file not found$") as info:
        load_storyboard(missing)
    assert info.value.line is None

    with pytest.raises(StoryboardError, match="is a directory") as info:
        load_storyboard(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")

    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"title: x\nfps: \xff\xfe\n")
    with pytest.raises(StoryboardError, match=r"bin\.yaml: is not UTF-8 text \(byte 0xff on line 2\)") as info:
        load_storyboard(binary)
    assert info.value.line is None


def test_load_storyboard_reports_file_path_and_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("duration: 2\nfps: x\nprompts: [{prompt: a}]\n", encoding="utf-8")
    with pytest.raises(StoryboardError) as info:
        load_storyboard(str(path))
    assert str(info.value).startswith(f"{path}:2: fps: expected an integer")
    path.write_text("\ufeffduration: 2\nprompts: [{prompt: a}]\n", encoding="utf-8")
    assert load_storyboard(path).source_path == str(path)


# --------------------------------------------------------------------------------------------------
# Timeline queries and source lines


def test_prompt_index_at_switch_times():
    sb = parse(FULL)  # switches at 3s and 5.5s
    assert sb.prompt_index_at(0) == 0
    assert sb.prompt_index_at(2.9999) == 0
    assert sb.prompt_index_at(3.0) == 1
    assert sb.prompt_index_at(3.0 - 1e-10) == 1  # within the 1e-9 tolerance
    assert sb.prompt_index_at(3.0 - 1e-6) == 0
    assert sb.prompt_index_at(3.0001) == 1
    assert sb.prompt_index_at(5.4999) == 1
    assert sb.prompt_index_at(5.5) == 2
    assert sb.prompt_index_at(5.5001) == 2
    assert sb.prompt_index_at(-1) == 0
    assert sb.prompt_index_at(100) == 2


def test_chunk_switch_rule_with_frame_times():
    # At 16 fps, frame 48 is exactly at 3s; 0.1 * 30 style rounding must not delay the switch.
    sb = parse("duration: 6\nprompts:\n  - prompt: a\n  - at: 3\n    prompt: b\n")
    chunk_starts = range(0, sb.total_frames, 12)
    assert [sb.prompt_index_at(f / sb.fps) for f in chunk_starts] == [0, 0, 0, 0, 1, 1, 1, 1]
    sb = parse("duration: 1\nprompts:\n  - prompt: a\n  - at: 0.3\n    prompt: b\n")
    assert sb.prompt_index_at(0.1 * 3) == 1


def test_total_frames_follow_the_readme_rule_and_zero_frames_is_refused_on_its_line():
    """round(duration × fps) frames (README); a storyboard that rounds to 0 frames is an error at `duration:`."""
    assert parse("duration: 0.04\nfps: 16\nprompts: [{prompt: a}]\n").total_frames == 1  # round(0.64)
    assert parse("duration: 1.53\nfps: 16\nprompts: [{prompt: a}]\n").total_frames == 24  # round(24.48)
    with pytest.raises(StoryboardError, match=r"^story.yaml:2: duration: .*rounds to 0"):
        parse_storyboard("fps: 16\nduration: 0.01\nprompts: [{prompt: a}]\n", "story.yaml")


def test_line_of_and_error_at():
    sb = parse(FULL)
    assert sb.line_of("resolution") == 4
    assert sb.line_of("prompts", 1, "at") == 16
    assert sb.line_of("memory", "window") == 12
    assert sb.line_of("prompts", 1, "until") is None
    err = sb.error_at("not supported by this model", "prompts", 1, "until")
    assert str(err) == "story.yaml:16: prompts[1].until: not supported by this model"
    assert sb.error_at("bad", "seed").line == 5


def test_check_resolution():
    sb = parse(FULL.replace('"128x64"', '"100x64"'))
    assert sb.check_resolution(4, (32, 32)) == (100, 64)
    with pytest.raises(StoryboardError) as info:
        sb.check_resolution(16, (32, 32))
    assert str(info.value) == (
        "story.yaml:4: resolution: 100x64 is not divisible by 16 (the model's stride); try 96x64"
    )
    default = parse("duration: 1\nprompts: [{prompt: a}]\n")
    assert default.check_resolution(8, (64, 48)) == (64, 48)
    with pytest.raises(StoryboardError, match=r"^story\.yaml: resolution: the model's default 40x48 is not"):
        default.check_resolution(16, (40, 48))


# --------------------------------------------------------------------------------------------------
# Round trips and overrides


def test_to_yaml_round_trip():
    odd_text = Storyboard(
        title="1984\nline\x85break: yes",
        duration=2,
        model="  x",
        prompts=[PromptSpan(start=0, end=1, text="- a: b # c"), PromptSpan(start=1, end=2, text="\u2028x")],
    )
    storyboards = [
        parse(FULL),
        load_storyboard(REPO / "storyboards" / "demo.yaml"),
        parse("prompts: [{prompt: a, until: 1}]"),
        odd_text,
    ]
    for sb in storyboards:
        again = parse_storyboard(sb.to_yaml(), "snapshot")
        assert again == sb
        assert again.source_path == "snapshot"


def test_with_overrides_revalidates():
    sb = parse(FULL)
    changed = sb.with_overrides(seed=7, memory={"policy": "sink", "sink": 1}, resolution="64x32")
    assert changed.seed == 7
    assert changed.memory == SinkConfig(policy="sink", sink=1, window=9)
    assert changed.resolution == (64, 32)
    assert changed.prompts == sb.prompts and changed.title == sb.title
    assert sb.seed == 42  # the original is unchanged
    assert changed.line_of("title") == 1 and changed.line_of("seed") is None

    longer = sb.with_overrides(duration="10s")
    assert longer.prompts[-1].end == 10.0 and longer.total_frames == 240
    assert sb.with_overrides(memory=WindowConfig(policy="window", window=3)).memory.window == 3
    assert sb.with_overrides(sampler=None).sampler is None

    new_prompts = [PromptSpan(start=0, end=5, text="a"), PromptSpan(start=5, end=8, text="b")]
    assert sb.with_overrides(prompts=new_prompts).prompts == new_prompts


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"seed": -1}, "story.yaml: seed: must be at least 0, got -1"),
        ({"fps": "fast"}, "story.yaml: fps: expected an integer, got 'fast'"),
        ({"memory": {"policy": "frames"}}, "story.yaml: memory.policy: unknown memory policy 'frames'"),
        ({"sedd": 3}, "story.yaml: unknown key 'sedd'; expected one of:"),
        ({"duration": 5}, "story.yaml:19: prompts[2].at: the last prompt starts at 5.5s, but the storyboard ends at 5s"),
        ({"resolution": "60"}, "story.yaml: resolution: expected WIDTHxHEIGHT"),
    ],
)
def test_bad_override_is_a_storyboard_error(overrides, expected):
    with pytest.raises(StoryboardError) as info:
        parse(FULL).with_overrides(**overrides)
    assert str(info.value).startswith(expected), str(info.value)


def test_direct_construction_checks_the_timeline():
    with pytest.raises(ValueError, match="without gaps"):
        Storyboard(duration=4, prompts=[PromptSpan(start=0, end=1, text="a"), PromptSpan(start=2, end=4, text="b")])
    with pytest.raises(ValueError, match="lasts 5s"):
        Storyboard(duration=5, prompts=[PromptSpan(start=0, end=4, text="a")])


# --------------------------------------------------------------------------------------------------
# Property tests: no input text escapes as anything but a StoryboardError


MESSAGE = re.compile(rf"^{re.escape(PATH)}(:\d+)?: \S")


def check_outcome(text: str) -> None:
    try:
        result = parse_storyboard(text, PATH)
    except StoryboardError as err:
        message = str(err)
        assert MESSAGE.match(message), message
        assert len(message.splitlines()) == 1, message
    else:
        assert isinstance(result, Storyboard)
        assert parse_storyboard(result.to_yaml(), PATH) == result


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes(text):
    check_outcome(text)


VALID_LINES = FULL.splitlines()

SCALARS = st.one_of(
    st.sampled_from(
        [
            "", "~", "null", "yes", "no", "true", "[]", "{}", "[1, 2]", "{a: 1}", "'quoted'", '"1:30"',
            "-1", "0", "1e400", "1.0e400", ".inf", "-.inf", ".nan", "!!binary aGk=", "*a", "&a x",
            "!foo bar", "!!int x", "!!float ''", "2024-01-01", "0x10", "0o17", "1:30", "0:01:30.5",
            "64x64", "1m30s", "-3s", ">", "|", "- x", "? x", "window", "sink", "bank", "9" * 5000,
        ]
    ),  # fmt: skip
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(repr),
    st.text(max_size=12),
)
KEYS = st.one_of(
    st.sampled_from(["title", "duration", "fps", "at", "until", "prompt", "memory", "policy", "sink", "<<"]),
    st.text(max_size=8),
)
LINE_INDEX = st.integers(min_value=0, max_value=len(VALID_LINES) - 1)
MUTATION = st.one_of(
    st.tuples(st.just("delete"), LINE_INDEX),
    st.tuples(st.just("duplicate"), LINE_INDEX),
    st.tuples(st.just("swap"), LINE_INDEX, LINE_INDEX),
    st.tuples(st.just("value"), LINE_INDEX, SCALARS),
    st.tuples(st.just("insert"), LINE_INDEX, KEYS, SCALARS, st.integers(0, 6)),
    st.tuples(st.just("indent"), LINE_INDEX, st.integers(-4, 4)),
)


def mutate(lines: list[str], mutation: tuple) -> None:
    if not lines:
        return
    kind, index, *args = mutation
    index %= len(lines)
    if kind == "delete":
        del lines[index]
    elif kind == "duplicate":
        lines.insert(index, lines[index])
    elif kind == "swap":
        other = args[0] % len(lines)
        lines[index], lines[other] = lines[other], lines[index]
    elif kind == "value":
        head, colon, _ = lines[index].partition(": ")
        lines[index] = f"{head}{colon or ': '}{args[0]}"
    elif kind == "insert":
        key, value, indent = args
        lines.insert(index, f"{' ' * indent}{key}: {value}")
    elif kind == "indent":
        shift = args[0]
        line = lines[index]
        lines[index] = " " * shift + line if shift >= 0 else line[min(-shift, len(line) - len(line.lstrip())) :]


@FAST
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_storyboards_never_crash(mutations):
    lines = list(VALID_LINES)
    for mutation in mutations:
        mutate(lines, mutation)
    check_outcome("\n".join(lines) + "\n")
