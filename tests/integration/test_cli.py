"""vlmctl's dry run and sub-command wiring, as a user calls them."""

import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
VLMCTL = [sys.executable, "-m", "vlm_operator.cli"]


def test_render_prints_every_stage_object_as_yaml():
    out = subprocess.run([*VLMCTL, "render", str(ROOT / "crds/examples/align-instruct-s3.yaml"), "-n", "team-a"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"] * 2
    assert {d["metadata"]["namespace"] for d in docs} == {"team-a"}
    job = docs[3]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"]
                       + job["spec"]["template"]["spec"]["containers"][0].get("args", []))
    assert "torchrun" in command and "--nnodes=2" in command and "-m vlm_trainer" in command


def test_render_rejects_an_invalid_job_by_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((ROOT / "crds/examples/align-instruct-s3.yaml").read_text())
    doc["spec"]["stages"][0]["resources"]["nodes"] = 0
    bad.write_text(yaml.safe_dump(doc))
    out = subprocess.run([*VLMCTL, "render", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "spec.stages[0].resources.nodes" in out.stderr and out.stdout == ""


def test_operator_subcommand_has_its_own_help():
    out = subprocess.run([*VLMCTL, "operator", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--liveness-port" in out.stdout


def test_render_uses_the_jobs_own_namespace_unless_n_overrides_it(tmp_path):
    doc = yaml.safe_load((ROOT / "crds/examples/align-instruct-s3.yaml").read_text())
    doc["metadata"]["namespace"] = "team-b"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    for extra, want in (([], "team-b"), (["-n", "team-c"], "team-c")):
        out = subprocess.run([*VLMCTL, "render", str(path), *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(out.stdout)} == {want}
