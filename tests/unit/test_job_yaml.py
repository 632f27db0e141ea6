"""A job file means to `vlmctl` what it means to `kubectl apply`: YAML 1.2 core-schema scalars, alias bombs
refused before they expand, and every URI field refusing a scheme nothing can read, by name."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import yaml
from job_fixtures import GOOD
from vlm_core.spec import SpecError, parse_job, parse_job_text
from vlm_core.spec.loading import MAX_ALIAS_NODES, _load_yaml
from vlm_core.validators import FILE_SCHEMES, STORAGE_SCHEMES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text,want",
    [
        ("1e-3", 1e-3), ("1.0e-5", 1.0e-5), ("5e-6", 5e-6), ("-2E+2", -200.0), (".5", 0.5), ("5.", 5.0),
        (".inf", math.inf), ("-.Inf", -math.inf), ("+.INF", math.inf),
        ("12", 12), ("-3", -3), ("017", 17), ("0o17", 15), ("0x1F", 31),
        ("true", True), ("True", True), ("TRUE", True), ("false", False), ("FALSE", False),
        ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("n", "n"), ("tRue", "tRue"),
        ("1_000", "1_000"), ("1:30", "1:30"), ("0b101", "0b101"), ("2024-01-01", "2024-01-01"),
        ("~", None), ("null", None), ("Null", None), ("NULL", None), ("", None),
    ],
)
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text: str, want: Any):
    got = _load_yaml(f"v: {text}\n", "<test>")["v"]
    assert got == want and type(got) is type(want), (text, got)


def test_nan_is_a_number_the_spec_then_refuses_by_name():
    assert math.isnan(_load_yaml("v: .nan\n", "<test>")["v"])


def _text_with(stage0: dict[str, str]) -> bytes:
    text = yaml.safe_dump(GOOD, sort_keys=False)
    extra = "".join(f"      {k}: {v}\n" for k, v in stage0.items())
    return text.replace("    maxSteps: 10\n", "    maxSteps: 10\n    optimizer:\n" + extra, 1).encode()


@pytest.mark.parametrize("lr", ["1e-3", "1.0e-5", "5e-6", "2E-4"])
def test_a_learning_rate_in_exponent_notation_is_a_number(lr: str):
    job = parse_job_text(_text_with({"lr": lr}))
    assert job.spec.stages[0].optimizer.lr == float(lr)


def test_yes_is_not_a_boolean():
    with pytest.raises(SpecError) as err:
        parse_job_text(yaml.safe_dump(GOOD, sort_keys=False).replace("  stages:\n", "  suspend: yes\n  stages:\n", 1)
                       .encode())
    assert "spec.suspend: must be true or false, got 'yes'" in err.value.problems


def _bomb(levels: int = 9) -> str:
    lines = ['    a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_under_labels_is_refused_before_expansion_naming_the_field():
    text = yaml.safe_dump(GOOD, sort_keys=False).replace("metadata:\n  name: demo\n",
                                                          "metadata:\n  name: demo\n  labels:\n" + _bomb(), 1)
    with pytest.raises(SpecError) as err:
        parse_job_text(text.encode())
    (problem,) = err.value.problems
    assert problem.startswith("metadata.labels.a8: YAML aliases expand this value to")
    assert "alias bomb" in problem and f"{MAX_ALIAS_NODES:,}" in problem


def test_a_recursive_alias_is_refused():
    with pytest.raises(SpecError, match="recursive alias"):
        parse_job_text(b"a: &a [*a]\n")


def test_a_few_anchors_and_aliases_stay_valid():
    text = yaml.safe_dump(GOOD, sort_keys=False)
    text = text.replace("    maxSteps: 10\n", "    maxSteps: 10\n    resources: &res {nodes: 1, procsPerNode: 2}\n"
                        "    batch: {globalSize: 16, microSize: 8}\n", 1)
    text = text.replace("    maxSteps: 5\n", "    maxSteps: 5\n    resources: *res\n    batch: {globalSize: 16, "
                        "microSize: 8}\n", 1)
    job = parse_job_text(text.encode())
    assert job.spec.stages[0].resources == job.spec.stages[2].resources
    assert job.spec.stages[2].resources.procs_per_node == 2


def _curate_job() -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"] = [
        {"name": "cur", "type": "curate", "input": {"shards": ["raw.tar"]}, "encoder": "/m/enc",
         "filters": {"nsfw": {"probe": "/m/probe.json"}, "balance": {"conceptsFile": "/m/c.txt", "perConceptCap": 5}}},
        {"name": "align", "type": "align", "data": {"fromStage": "cur", "format": "caption"}, "maxSteps": 10},
    ]
    return doc


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = doc
    keys = path.replace("]", "").replace("[", ".").split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return doc


BAD_URI = "nosuchscheme://x/y.tar"
# (document, field path, whether the field is a list, the schemes it accepts)
URI_FIELDS = [
    (GOOD, "spec.model.visionEncoder", False, STORAGE_SCHEMES),
    (GOOD, "spec.model.languageModel", False, STORAGE_SCHEMES),
    (GOOD, "spec.stages[0].data.shards", True, FILE_SCHEMES),
    (GOOD, "spec.stages[0].data.evalShards", True, FILE_SCHEMES),
    (_curate_job(), "spec.stages[0].input.shards", True, FILE_SCHEMES),
    (_curate_job(), "spec.stages[0].encoder", False, STORAGE_SCHEMES),
    (_curate_job(), "spec.stages[0].filters.nsfw.probe", False, FILE_SCHEMES),
    (_curate_job(), "spec.stages[0].filters.balance.conceptsFile", False, FILE_SCHEMES),
]


@pytest.mark.parametrize("doc,path,is_list,accepted", URI_FIELDS, ids=[f[1] for f in URI_FIELDS])
def test_an_unknown_uri_scheme_is_refused_naming_the_field_and_the_accepted_ones(doc, path, is_list, accepted):
    bad = _set(copy.deepcopy(doc), path, [BAD_URI] if is_list else BAD_URI)
    with pytest.raises(SpecError) as err:
        parse_job(bad)
    line = next(p for p in err.value.problems if p.startswith(f"{path}: unknown URI scheme nosuchscheme://"))
    assert all(f"{s}://" in line for s in accepted) and "plain path" in line
    for scheme in accepted:  # and every accepted one passes
        ok = f"{scheme}://bucket/x/y.tar"
        parse_job(_set(copy.deepcopy(doc), path, [ok] if is_list else ok))


def test_source_shards_and_storage_uri_refuse_unknown_schemes_too():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][1]["data"] = {"sources": [{"shards": ["a.tar"], "format": "conversation"},
                                                    {"shards": [BAD_URI], "format": "caption"}]}
    doc["spec"]["storage"]["uri"] = "nosuchscheme://b/runs"
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    got = err.value.problems
    assert any(p.startswith("spec.stages[1].data.sources[1].shards: unknown URI scheme nosuchscheme://") for p in got)
    assert any(p.startswith("spec.storage.uri: scheme must be one of file://, s3://, gs://") for p in got), got


def test_plain_and_relative_paths_need_no_scheme():
    doc = copy.deepcopy(GOOD)
    doc["spec"]["stages"][0]["data"]["shards"] = ["data/train-{000..003}.tar", "/abs/x.tar", "weird:name.tar"]
    parse_job(doc)
