"""Property tests: the profile and configuration parsers reject bad input only with DeployError.

Whatever the document, text or argument list, parsing either succeeds with a
usable result or raises ``DeployError`` (argparse: exit code 2 with one error
line); no other exception escapes.
"""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from contextlib import redirect_stderr

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.cli import build_parser, config_from_args
from deploy.errors import DeployError
from deploy.passes.quantize import QuantizeConfig
from deploy.pipeline import OptimizeConfig
from deploy.profiles import (
    DeviceProfile,
    ProfileVersionWarning,
    load_profile,
    new_local_profile,
    timing_protocol,
    validate_profile,
)

# Cases per property; the totals are reported in docs/benchmarks.md.
EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=25,
)

VALID = new_local_profile("fuzz").data
VALID["measured"] = True
VALID["latency_table"] = [
    {
        "op": "conv2d",
        "input_shape": [1, 1, 8, 8],
        "weight_shape": [8, 1, 3, 3],
        "stride": [1, 1],
        "padding": [1, 1],
        "groups": 1,
        "option": "dense",
        "precision": "fp32",
        "p50_ms": 0.01,
        "p90_ms": 0.02,
        "runs": 10,
    }
]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


PATHS = [p for p in _paths(VALID) if p]


def _use(data) -> None:
    """Build everything a run builds from a profile that passed validation."""
    profile = DeviceProfile(data)
    protocol = timing_protocol(profile)
    assert protocol.runs >= 1
    assert profile.threads >= 1
    for entry in data["latency_table"]:
        assert math.isfinite(entry["p50_ms"])


def test_valid_profile_passes():
    validate_profile(copy.deepcopy(VALID), "valid")
    _use(copy.deepcopy(VALID))


@FUZZ
@given(documents)
def test_profile_any_document(document):
    try:
        validate_profile(document, "fuzz")
    except DeployError:
        return
    _use(document)


@FUZZ
@given(st.sampled_from(PATHS), documents)
def test_profile_one_field_replaced(path, value):
    data = copy.deepcopy(VALID)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        validate_profile(data, "fuzz")
    except DeployError as exc:
        assert "\n" not in str(exc)
        return
    _use(data)


@FUZZ
@given(st.sampled_from(PATHS))
def test_profile_one_field_removed(path):
    data = copy.deepcopy(VALID)
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    try:
        validate_profile(data, "fuzz")
    except DeployError:
        return
    _use(data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)), st.sampled_from(["yaml", "json"]))
def test_profile_file_any_bytes(tmp_path, content, suffix):
    path = tmp_path / f"fuzz.{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProfileVersionWarning)
            profile = load_profile(path)
    except DeployError:
        return
    _use(profile.data)


@FUZZ
@given(st.sampled_from(PATHS), documents, st.sampled_from(["yaml", "json"]))
def test_profile_file_one_field_replaced(tmp_path, path, value, suffix):
    data = copy.deepcopy(VALID)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    file = tmp_path / f"fuzz.{suffix}"
    try:
        text = json.dumps(data) if suffix == "json" else yaml.safe_dump(data)
    except (ValueError, yaml.YAMLError):
        return
    file.write_text(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProfileVersionWarning)
            profile = load_profile(file)
    except DeployError:
        return
    _use(profile.data)


config_values = st.one_of(
    documents,
    st.lists(st.sampled_from(["lowrank", "prune", "quantize", "fp16", ""]), max_size=4).map(tuple),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
)
CONFIG_FIELDS = [
    "budgets_ms",
    "num_budgets",
    "passes",
    "calibration_fraction",
    "finetune",
    "quantize",
    "space",
    "task",
    "max_calibration_samples",
]


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), config_values, max_size=4))
def test_optimize_config_any_values(values):
    try:
        config = OptimizeConfig(**values)
    except DeployError as exc:
        assert "\n" not in str(exc)
        return
    # A config that constructs is complete and serializes.
    json.dumps(config.to_dict())
    assert config.passes
    assert all(p in ("lowrank", "prune", "quantize") for p in config.passes)
    if config.budgets_ms is not None:
        assert all(math.isfinite(b) and b > 0 for b in config.budgets_ms)


@FUZZ
@given(st.lists(st.one_of(st.none(), st.text(max_size=8), st.integers()), max_size=4))
def test_keep_float_any_values(names):
    try:
        config = QuantizeConfig(keep_float=names)
    except ValueError:
        return
    assert all(isinstance(n, str) and n.strip() for n in config.keep_float)


OPTIONS = [
    "--budget-ms",
    "--num-budgets",
    "--passes",
    "--task",
    "--keep-float",
    "--no-finetune",
    "--resume",
    "--allow-pickle",
    "--model",
    "--data",
    "--out",
    "--device-profile",
]
values = st.one_of(
    st.sampled_from(["0.5", "-1", "nan", "inf", "1e309", "0", "3", "1,2", ",", "", "x"]),
    st.sampled_from(["lowrank,prune", "quantize", "distill", "classification", "embedding"]),
    st.text(max_size=10),
    st.floats().map(str),
    st.integers().map(str),
)
argv = st.lists(st.one_of(st.sampled_from(OPTIONS), values), max_size=8)


@FUZZ
@given(argv)
def test_cli_arguments_any_tokens(tokens):
    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr):
            args = build_parser().parse_args(["optimize", *tokens])
    except SystemExit as exc:
        assert exc.code == 2
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        assert len(lines) == 1, stderr.getvalue()
        assert lines[0].startswith("deploy: error: ")
        return
    try:
        config = config_from_args(args)
    except DeployError:
        return
    if args.budget_ms is not None:
        assert all(math.isfinite(b) and b > 0 for b in config.budgets_ms)
    assert config.num_budgets >= 1


@pytest.mark.parametrize("flag", ["--help"])
def test_cli_help_exits_zero(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["optimize", flag])
    assert exc.value.code == 0
    assert "--keep-float" in capsys.readouterr().out
