"""scripts/demo.sh argument handling, through its dry run (prints the launch command, runs nothing)."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"
CPU_RANKS = [] if torch.cuda.is_available() else ["--num_gpus", "2"]


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLD_DEMO_DRY_RUN": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(DEMO), *args], env=env, capture_output=True, text=True, timeout=120)


def _command(*args: str) -> list[str]:
    proc = _dry_run(*args)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def _split(command: list[str]) -> tuple[list[str], int | None, list[str]]:
    """(launcher args without the port, the picked port, program args)."""
    assert command[0] == "deepspeed", command
    at = command.index("launch/distill.py")
    launcher, program = command[1:at], command[at + 1:]
    i = launcher.index("--master_port")
    return launcher[:i] + launcher[i + 2:], int(launcher[i + 1]), program


def test_picks_a_free_port_not_the_default():
    launcher, port, program = _split(_command())
    assert launcher == CPU_RANKS and program == []
    assert port != 29500 and 1024 <= port < 65536
    with socket.socket() as s:  # free: it can be bound right after
        s.bind(("", port))


def test_without_separator_every_argument_goes_to_the_program():
    launcher, _, program = _split(_command("train.max_steps=3", "--fresh", "data.train=[a b.txt]"))
    assert launcher == CPU_RANKS
    assert program == ["train.max_steps=3", "--fresh", "data.train=[a b.txt]"]


@pytest.mark.parametrize("port_args", [["--master_port", "12345"], ["--master_port=12345"]])
def test_launcher_args_pass_through_and_a_given_port_is_kept(port_args):
    command = _command("--num_gpus", "1", *port_args, "--", "train.max_steps=3", "--", "x=1")
    at = command.index("launch/distill.py")
    assert command[1:at] == ["--num_gpus", "1", *port_args]  # no second port, no CPU default ranks
    assert command[at + 1:] == ["train.max_steps=3", "--", "x=1"]  # only the first -- separates


def test_launcher_args_only():
    launcher, _, program = _split(_command("--include", "localhost:0", "--"))
    assert launcher == ["--include", "localhost:0"] and program == []


def test_launcher_option_without_separator_is_refused_with_the_fix():
    proc = _dry_run("--num_gpus", "1", "train.max_steps=3")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "bash scripts/demo.sh --num_gpus 1 -- train.max_steps=20" in proc.stderr
