"""The guides' shell blocks run as a user runs them: in order, in a fresh folder (the checkout's
.venv and scripts linked in), in a clean environment; every command must succeed, and a
printed output shown in the guide must be what the commands print."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO_ROOT, cli_env

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: str) -> list[tuple[str, str]]:
    """``(language, text)`` of each fenced block of a page of docs/, in order."""
    return FENCE.findall((REPO_ROOT / "docs" / page).read_text())


def run_page(page: str, folder) -> list[str]:
    """Run every ``bash`` block of ``page`` in ``folder``; the output of each block."""
    for name in (".venv", "train.py", "evaluate.py", "predict.py"):
        (folder / name).symlink_to(REPO_ROOT / name)
    outputs = []
    for language, text in blocks(page):
        if language != "bash":
            continue
        done = subprocess.run(
            ["bash", "-e", "-c", text],
            cwd=folder,
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=900,
        )
        assert done.returncode == 0, f"{page}:\n{text}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    return outputs


def test_own_data_guide(tmp_path):
    outputs = run_page("own-data.md", tmp_path)
    shown = [text for language, text in blocks("own-data.md") if language == ""]
    check_output = shown[0]
    assert check_output in outputs[0], outputs[0]
    assert (tmp_path / "runs" / "my-parts" / "calibration.json").is_file()
    assert (tmp_path / "found" / "defects.jsonl").is_file()
    members = (tmp_path / "runs" / "sweep" / "members.csv").read_text().splitlines()
    assert len(members) == 1 + 4 + 1  # the header, 4 members, their mean


@pytest.mark.parametrize("page", ["own-data.md"])
def test_every_shell_block_names_commands_that_exist(page):
    for language, text in blocks(page):
        if language == "bash":
            for command in re.findall(r"\.venv/bin/(\S+)", text):
                assert (REPO_ROOT / ".venv" / "bin" / command).exists(), command
