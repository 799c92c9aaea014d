"""The README's commands: every code block carries a check marker, and the fast ones run as written
(the tiny config, the planner on it, the "Your own loop" example), with their outputs checked.
`make readme` runs the rest."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import check_readme  # noqa: E402


def test_every_readme_block_is_marked_and_the_fast_ones_are_the_promised_ones():
    blocks = check_readme.parse(open(os.path.join(ROOT, "README.md")).read())
    fast = [c for b in blocks if b.speed == "fast" for c in b.commands]
    assert any("configs/tiny.py --workdir=runs/tiny" in c for c in fast)
    assert any(c.startswith("python -m rlhf_jax.plan --config=configs/tiny.py") for c in fast)
    assert any("make_update" in c for c in fast)  # the own-loop example
    assert {b.speed for b in blocks} == {"fast", "slow", "skip"}


@pytest.mark.parametrize("text,message", [
    ("Intro:\n\n    make demo\n", "README.md:3: indented code block"),
    ("```sh\nmake demo\n```\n", "README.md:1: ```sh block without a '<!-- check: ... -->' marker"),
    ("<!-- check: quick -->\n```sh\nmake demo\n```\n", "marker 'quick'"),
    ("<!-- check: skip -->\n```python\nx = 1\n```\n", "'skip' needs a reason"),
    ("<!-- check: fast -->\n```sh\nmake demo\n", "unclosed code fence"),
])
def test_malformed_readmes_are_named(text, message):
    with pytest.raises(check_readme.ReadmeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_readme.parse(text)


def test_markers_and_continued_lines_are_read():
    text = ("- a list item\n    its indented continuation\n\n<!-- check: slow 90 -->\n```bash\n"
            "python a.py \\\n    --flag\n# a comment\nmake b\n```\n\n<!-- check: parallel fast -->\n```sh\nx\ny\n```\n"
            "\n```text\n    not a command\n```\n")
    slow, parallel = check_readme.parse(text)
    assert (slow.speed, slow.limit_s, slow.commands, slow.line) == ("slow", 90, ["python a.py      --flag", "make b"], 6)
    assert parallel.parallel and parallel.speed == "fast" and parallel.commands == ["x", "y"]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """The fast README commands, run once by the checker in a copy of this tree: (report, {command: output})."""
    outputs = tmp_path_factory.mktemp("readme")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_readme.py"), "--only=fast", "--here",
                             f"--outputs={outputs}"], capture_output=True, text=True, timeout=1200)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0 and report["ok"], result.stdout[-4000:]
    ran = [c for c in report["commands"] if c["speed"] == "fast"]
    return ran, {c["command"]: open(c["output_file"]).read() for c in ran}


def test_the_fast_readme_commands_run_as_written(fast_run):
    ran, _ = fast_run
    assert len(ran) >= 3 and all(c["status"] == "ok" for c in ran)


def test_the_own_loop_example_trains_from_kl_zero(fast_run):
    _, outputs = fast_run
    printed = next(out for command, out in outputs.items() if command.startswith("import jax")).strip().splitlines()
    assert [line.split()[0] for line in printed] == ["0", "1", "2"]
    assert all(np.isfinite(float(v)) for line in printed for v in line.split()[1:])
    # Iteration 0 samples from the reference itself: the KL is 0 up to the decode/scoring arithmetic.
    assert abs(float(printed[0].split()[2])) < 1e-4


def test_the_planner_on_local_devices_prints_a_json_line(fast_run):
    _, outputs = fast_run
    output = next(out for command, out in outputs.items() if command.startswith("python -m rlhf_jax.plan"))
    report = json.loads(output.strip().splitlines()[-1])
    assert report["fits"] and report["devices"] >= 1
    for name in ("rollout", "update"):
        f = report["functions"][name]
        assert f["total_gib"] > 0 and f["flops"] > 0 and f["compile_s"] > 0
        # The total counts the resident train state, more than the function's own temporaries.
        assert f["total_gib"] > f["temp_gib"]
        # Time: a roofline estimate on this machine's measured speed, and the function run for real.
        assert f["est_s"] > 0 and f["est_bound"] in ("compute", "hbm", "ici") and f["measured_s"] > 0
        assert f["model_flops"] > 0 and f["measured_over_est"] == pytest.approx(f["measured_s"] / f["est_s"])
    rollout = report["functions"]["rollout"]
    decode = [loop for loop in rollout["loops"] if "/decode/" in loop["op_name"]]
    # tiny.py: max_new_tokens = 8, the first sampled from the prefill's output, 7 in the loop
    assert [loop["trips"] for loop in decode] == [7], rollout["loops"]
    assert rollout["per_token_comm_mib"] == 0  # one device
    assert report["iteration"]["est_s"] == pytest.approx(
        report["functions"]["rollout"]["est_s"] + report["functions"]["update"]["est_s"])
    assert "rollout" in output and "update" in output and "measured s" in output
