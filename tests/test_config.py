"""hf_r1ewc.config: --method and the older flags that spell it, the registry of components, and a manifest recorded
before --method existed."""

from __future__ import annotations

import pytest

from hf_r1ewc.config import METHODS, canonical_method, method_from_legacy, parse_args, recorded_defaults


BASE = ["--dataset_name", "digits", "--output_dir", "unused"]
SPELLING = ("method", "ewc_type", "replay", "joint")


def spelled(*flags: str) -> tuple:
    args = parse_args([*BASE, *flags])
    return tuple(getattr(args, k) for k in SPELLING)


@pytest.mark.parametrize(
    "method, legacy",
    [
        (["--method", "rank1+gd"], []),
        (["--method", "gd+rank1"], ["--ewc_type", "rank1", "--replay", "on"]),
        (["--method", "gd"], ["--ewc_type", "none"]),
        (["--method", "diag"], ["--ewc_type", "diag", "--replay", "off"]),
        (["--method", "naive"], ["--ewc_type", "none", "--replay", "off"]),
        (["--method", "joint"], ["--joint"]),
    ],
)
def test_every_spelling_of_a_method_records_the_same_settings(method, legacy):
    """--method and the older flags give the same four settings, so a run resumes whichever spelling it is given
    (the manifest records all of them)."""
    assert spelled(*method) == spelled(*legacy)


def test_method_parsing_names_the_problem():
    assert canonical_method(" gd + rank1_unscaled") == "rank1_unscaled+gd"  # composition order, whatever written
    for spec, message in [
        ("gd+l9", r"unknown component\(s\) \['l9'\]"),
        ("gd+gd", "names a component twice"),
        ("naive+gd", "naive cannot be combined"),
        ("rank1+diag", "rank1 and diag are each a weight regulariser; choose one"),
        ("si+l2", "si and l2 are each a weight regulariser"),
        ("ensemble+er", "ensemble cannot be combined with another component; each task trains its own model"),
        ("rank1+ensemble", "so no other method has an old task to protect in it"),
    ]:
        with pytest.raises(ValueError, match=message):
            canonical_method(spec)
    for flags, message in [
        (["--method", "gd", "--ewc_type", "diag"], "--method gd and --ewc_type diag disagree"),
        (["--method", "rank1", "--replay", "on"], "--method rank1 and --replay on disagree"),
        (["--method", "gd", "--joint"], "--method gd and --joint disagree"),
        (["--method", "si", "--mixed_precision", "fp16"], "fp16's gradient scaler"),
        (["--method", "er", "--push_exemplars"], "--push_exemplars uploads the exemplar images of a streamed"),
        (["--method", "gd", "--ensemble_from_scratch"], "add ensemble to --method or drop --ensemble_from_scratch"),
        (
            ["--method", "ensemble", "--ensemble_from_scratch", "--use_ema"],
            "--use_ema would average it with the previous task's weights",
        ),
    ]:
        with pytest.raises(SystemExit, match=message):
            parse_args([*BASE, *flags])


def test_a_manifest_recorded_before_method_existed_reads_as_its_method():
    """An old manifest has ewc_type/replay/joint but no method: its method is what those spell, so the same
    command resumes it; the components' own flags read as their defaults."""
    assert recorded_defaults({"ewc_type": "rank1", "replay": "off", "joint": False})["method"] == "rank1"
    assert recorded_defaults({"ewc_type": "none", "replay": "on", "joint": False})["method"] == "gd"
    assert method_from_legacy("diag", "on", True) == "joint"
    assert "method" not in recorded_defaults({})


def test_help_names_every_component():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert all(f"{name}:" in text for name in METHODS)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "si+gd", "--si_weight", "nan"], "--si_weight must be a finite number >= 0, got nan"),
        (["--method", "si+gd", "--si_weight", "inf"], "--si_weight must be a finite number >= 0, got inf"),
        (["--method", "si", "--si_xi", "0"], r"--si_xi must be a finite number > 0, got 0.0"),
        (["--method", "l2", "--l2_weight", "-5"], "--l2_weight must be a finite number >= 0, got -5.0"),
        (["--method", "mas", "--mas_weight", "nan"], "--mas_weight must be a finite number >= 0"),
        (["--method", "kd", "--kd_weight", "-1"], "--kd_weight must be a finite number >= 0"),
        (["--method", "er", "--er_weight", "inf"], "--er_weight must be a finite number > 0, got inf"),
        (["--method", "er", "--er_weight", "0"], "--er_weight must be a finite number > 0"),
        (["--method", "er", "--er_batch_size", "-3"], "--er_batch_size must be an integer >= 1, got -3"),
        (["--method", "er", "--er_batch_size", "0"], "--er_batch_size must be an integer >= 1, got 0"),
        (["--method", "er", "--er_per_class", "0"], "--er_per_class must be an integer >= 1"),
        (["--method", "er", "--er_reservoir", "0"], "--er_reservoir must be an integer >= 1"),
        (["--method", "agem", "--agem_batch_size", "0"], "--agem_batch_size must be an integer >= 1"),
        (
            ["--method", "er", "--si_weight", "3"],
            "--si_weight 3.0 is a setting of the si component, which --method er",
        ),
        (["--method", "gd", "--er_per_class", "5"], "add er to --method or drop --er_per_class"),
        (
            ["--method", "gd", "--ewc_lambda", "100"],
            "--ewc_lambda 100.0 weighs an EWC penalty, and --method gd has none",
        ),
    ],
)
def test_every_method_flag_is_checked_before_anything_is_loaded(flags, message, capsys):
    """Each used to pass: a constructor's ValueError traceback at start-up, an inf weight that trained task 1 and
    stopped at task 2, a negative batch that crashed after task 1, 0 read as the default, or a flag of a component
    that --method leaves out ignored without a word. Now: an `error:` line from the parser."""
    with pytest.raises(SystemExit, match=message) as raised:
        parse_args([*BASE, *flags])
    assert str(raised.value).startswith("error: ")


def test_method_flags_in_range_and_of_the_selected_components_pass():
    args = parse_args([*BASE, "--method", "er+rank1", "--er_per_class", "5", "--er_batch_size", "8"])
    assert (args.er_per_class, args.er_batch_size, args.si_weight) == (5, 8, 5.0)
    assert parse_args([*BASE, "--method", "si+gd", "--si_weight", "0", "--si_xi", "1e-3"]).si_xi == 1e-3
