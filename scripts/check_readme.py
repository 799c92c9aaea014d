"""Run the README's commands as a new user would, and say which one failed and why.

Every fenced ```sh or ```python block of README.md carries a marker comment on the line before it:

    <!-- check: fast -->            run it (also in the test suite)
    <!-- check: slow 1800 -->       run it with `make readme` only; the number is its time limit in seconds
    <!-- check: parallel slow -->   its commands start together (processes of one multi-host run)
    <!-- check: skip REASON -->     never run (say why: needs a TPU VM, a sketch with placeholders, ...)

A block without a marker, or an indented code block (which cannot carry one), is an error: a new
command cannot slip into the README unchecked. Shell blocks run one command at a time (a trailing
backslash continues a line) with `bash -c`; python blocks run as a script. Both run with `.venv/bin`
first on PATH, as after `source .venv/bin/activate` (the README's set-up commands make `.venv`).

    python scripts/check_readme.py                  # every runnable block, in a fresh clone of HEAD
    python scripts/check_readme.py --only=fast --here   # the fast ones in a copy of this working tree
    python scripts/check_readme.py --list               # the blocks and their markers

The last line of output is one JSON object: {"ok": bool, "commands": [{"line", "command", "speed",
"status", "seconds"}]}. Exit status 1 when a command failed, 2 when the README is malformed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!--\s*check:\s*(.*?)\s*-->")
FAST_LIMIT_S = 300
SLOW_LIMIT_S = 1800


class ReadmeError(ValueError):
    """A README block the checker cannot classify."""


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the block's first command
    lang: str  # "sh" or "python"
    commands: list[str]  # a python block is one command: its whole source
    speed: str  # "fast", "slow" or "skip"
    limit_s: int
    parallel: bool = False
    reason: str = ""


def _marker(text: str, line: int) -> tuple[str, int, bool, str]:
    words = text.split()
    parallel = bool(words) and words[0] == "parallel"
    words = words[parallel:]
    if not words or words[0] not in ("fast", "slow", "skip"):
        raise ReadmeError(f"README.md:{line}: marker {text!r}: say fast, slow [seconds], parallel ... or skip REASON")
    speed = words[0]
    if speed == "skip":
        if len(words) < 2:
            raise ReadmeError(f"README.md:{line}: 'skip' needs a reason")
        return speed, 0, parallel, " ".join(words[1:])
    limit = FAST_LIMIT_S if speed == "fast" else SLOW_LIMIT_S
    if len(words) > 1:
        if not words[1].isdigit():
            raise ReadmeError(f"README.md:{line}: time limit {words[1]!r} is not a number of seconds")
        limit = int(words[1])
    return speed, limit, parallel, ""


def _shell_commands(lines: list[str], first: int) -> list[tuple[int, str]]:
    commands, current, start = [], "", first
    for offset, raw in enumerate(lines):
        if not current:
            start = first + offset
        text = raw.rstrip()
        if text.endswith("\\"):
            current += text[:-1] + " "
            continue
        current += text
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append((start, current.strip()))
        current = ""
    return commands


def parse(readme: str) -> list[Block]:
    """The README's code blocks with their markers, in order."""
    lines = readme.splitlines()
    blocks, i, in_prose_gap = [], 0, True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            close = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if close is None:
                raise ReadmeError(f"README.md:{i + 1}: unclosed code fence")
            lang = fence.group(1)
            if lang in ("sh", "bash", "python"):
                prev = lines[i - 1] if i else ""
                found = MARKER.search(prev)
                if not found:
                    raise ReadmeError(f"README.md:{i + 1}: ```{lang} block without a '<!-- check: ... -->' "
                                      "marker on the line before it")
                speed, limit, parallel, reason = _marker(found.group(1), i)
                body = lines[i + 1:close]
                if lang == "python":
                    commands = [(i + 2, "\n".join(body))]
                else:
                    commands = _shell_commands(body, i + 2)
                if not commands:
                    raise ReadmeError(f"README.md:{i + 1}: empty ```{lang} block")
                blocks.append(Block(commands[0][0], "python" if lang == "python" else "sh",
                                    [c for _, c in commands], speed, limit, parallel, reason))
            i, in_prose_gap = close + 1, False
            continue
        if line.startswith("    ") and line.strip() and in_prose_gap and not re.match(r"^\s*([-*+]|\d+\.)\s", line):
            raise ReadmeError(f"README.md:{i + 1}: indented code block: make it a fenced ```sh block "
                              "(or ```text) so that it can carry a check marker")
        # An indented line opens a code block only after a blank line (not inside a list item's text).
        in_prose_gap = not line.strip() or (in_prose_gap and line.startswith("    "))
        i += 1
    return blocks


def _copy_tree(dest: str) -> None:
    """This working tree's files that git tracks or would track (not .venv, runs, caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def _environment(workdir: str, here: bool) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # A fresh clone: the venv the README's set-up makes. --here: the interpreter running this check.
    bin_dir = os.path.join(workdir, ".venv", "bin") if not here else os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = os.path.dirname(bin_dir)
    return env


def _run(block: Block, workdir: str, env: dict):
    """Run a block's commands, yielding one result per command as it ends (a parallel block's when
    all of them have); stops after a failing group."""
    def start(command):
        if block.lang == "python":
            with tempfile.NamedTemporaryFile("w", suffix=".py", dir=workdir, delete=False) as f:
                f.write(command)
            argv = ["python", f.name]
        else:
            argv = ["bash", "-c", command]
        return subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def finish(process, began):
        try:
            output, _ = process.communicate(timeout=max(1.0, block.limit_s - (time.time() - began)))
            status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            output, _ = process.communicate()
            status = f"timed out after {block.limit_s} s"
        return status, output

    groups = [block.commands] if block.parallel else [[c] for c in block.commands]
    for group in groups:
        began = time.time()
        processes = [start(c) for c in group]
        results = []
        for command, process in zip(group, processes):
            status, output = finish(process, began)
            results.append({"line": block.line, "command": command.splitlines()[0] + (" ..." if "\n" in command else ""),
                            "speed": block.speed, "status": status, "seconds": round(time.time() - began, 1),
                            "output": output})
        yield from results
        if any(r["status"] != "ok" for r in results):
            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("fast", "all"), default="all", help="which blocks to run")
    parser.add_argument("--here", action="store_true",
                        help="run in a copy of this working tree with this interpreter, not in a fresh clone of HEAD")
    parser.add_argument("--limit_at_most", type=int, default=0,
                        help="> 0: only the blocks whose time limit is at most this many seconds")
    parser.add_argument("--list", action="store_true", help="list the blocks and their markers; run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    parser.add_argument("--outputs", default="", help="write each command's output to this folder, "
                        "as README-<line>-<n>.txt (n: the command's place in its block)")
    args = parser.parse_args(argv)
    try:
        with open(os.path.join(ROOT, "README.md")) as f:
            blocks = parse(f.read())
    except ReadmeError as e:
        print(f"check_readme: {e}", file=sys.stderr)
        return 2
    if args.list:
        for b in blocks:
            tag = f"skip ({b.reason})" if b.speed == "skip" else f"{b.speed} {b.limit_s} s"
            for c in b.commands:
                print(f"README.md:{b.line:<4} {tag:<24} {'parallel ' if b.parallel else ''}{c.splitlines()[0]}")
        return 0
    workdir = tempfile.mkdtemp(prefix="readme-check-")
    if args.here:
        _copy_tree(workdir)
    else:
        subprocess.run(["git", "clone", "-q", ROOT, workdir + "/repo"], check=True)
        workdir += "/repo"
    env = _environment(workdir, args.here)
    results, failed = [], False
    for block in blocks:
        too_long = bool(args.limit_at_most) and block.limit_s > args.limit_at_most
        if block.speed == "skip" or (args.only == "fast" and block.speed != "fast") or too_long or failed:
            for c in block.commands:
                status = (f"skipped: {block.reason}" if block.speed == "skip" else
                          f"not run: limit {block.limit_s} s > --limit_at_most" if too_long and not failed else "not run")
                results.append({"line": block.line, "command": c.splitlines()[0], "speed": block.speed,
                                "status": status, "seconds": 0.0})
            continue
        for n, r in enumerate(_run(block, workdir, env)):
            output = r.pop("output")
            if args.outputs:
                os.makedirs(args.outputs, exist_ok=True)
                r["output_file"] = os.path.join(args.outputs, f"README-{r['line']}-{n}.txt")
                with open(r["output_file"], "w") as f:
                    f.write(output)
            print(f"{r['status']:<10} {r['seconds']:>7.1f} s  README.md:{r['line']}  {r['command']}", flush=True)
            if r["status"] != "ok":
                failed = True
                print("    " + "\n    ".join(output.rstrip().splitlines()[-25:]), flush=True)
            results.append(r)
    if args.keep or failed:
        print(f"working folder kept: {workdir}")
    else:
        shutil.rmtree(os.path.dirname(workdir) if not args.here else workdir, ignore_errors=True)
    print(json.dumps({"ok": not failed, "commands": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
