"""Shell integration: tab completion in real bash, zsh and fish, the generated completion
scripts and manual pages, and help with examples on every command."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, Runner

from llmctl.cli import shell_files

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "completions"
DEFAULT_BREAKS = " \t\n\"'><=;|&(:"


@pytest.fixture
def stored(llmctl: Runner, tiny_folder: Path) -> None:
    """smollm2:135m (text) and tiny:latest (image) in the test's store."""
    for args in (("pull", "smollm2"), ("pull", str(tiny_folder), "--name", "tiny")):
        result = llmctl(*args)
        assert result.returncode == 0, result.stderr


def shell_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


# -- bash, as its completion machinery calls the function ------------------------------------

def bash_complete(line: str, breaks: str = DEFAULT_BREAKS, cwd: Path | None = None
                  ) -> list[str]:
    """COMPREPLY for the cursor at the end of `line`, with COMP_WORDS split as bash splits
    them with `breaks` as COMP_WORDBREAKS, through the function the script registers."""
    words = [w for w in re.split(f"([{re.escape(breaks)}])", line) if w and not w.isspace()]
    if line.endswith(" ") or not words:
        words.append("")
    script = f"""
        source {shlex.quote(str(SCRIPTS / "llmctl.bash"))}
        COMP_WORDBREAKS={shlex.quote(breaks)}
        COMP_LINE={shlex.quote(line)}
        COMP_POINT=${{#COMP_LINE}}
        COMP_WORDS=({" ".join(shlex.quote(w) for w in words)})
        COMP_CWORD={len(words) - 1}
        function=$(complete -p llmctl | sed -E 's/.*-F ([^ ]+).*/\\1/')
        "$function" llmctl {shlex.quote(words[-1])} {shlex.quote(words[-2])}
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", script],
                            capture_output=True, text=True, env=shell_env(), timeout=60,
                            cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return [r for r in result.stdout.split("\n") if r]


def inserted(line: str, reply: str, breaks: str = DEFAULT_BREAKS) -> str:
    """The command line after bash puts `reply` in place of the word it completed (the
    part after the last break character)."""
    cut = max((line.rfind(c) for c in breaks), default=-1)
    return line[:cut + 1] + reply


def test_bash_completes_commands_options_and_values(stored: None) -> None:
    assert bash_complete("llmctl ru") == ["run"]
    assert "bench" in bash_complete("llmctl ")
    assert bash_complete("llmctl run --temp") == ["--temperature"]
    assert bash_complete("llmctl convert smollm2 --to c") == ["coreml"]
    assert bash_complete("llmctl bench smollm2 -o js") == ["json", "jsonl"]
    assert set(bash_complete("llmctl imagine tiny --scheduler dpm")) == {"dpm++", "dpm++-sde"}
    assert bash_complete("llmctl completion f") == ["fish"]
    assert bash_complete("llmctl catalog ex") == ["export"]
    # --opt=value: bash breaks the word at '=', the value alone is offered
    assert bash_complete("llmctl run --engine=m") == ["mlx"]


def test_bash_completes_model_names_by_kind(stored: None) -> None:
    run = bash_complete("llmctl run ")
    assert "smollm2" in run and "smollm2:135m" in run and "tiny" not in run
    imagine = bash_complete("llmctl imagine ")
    assert "tiny:latest" in imagine and "smollm2:135m" not in imagine
    assert "tiny:latest" in bash_complete("llmctl rm ")
    assert bash_complete("llmctl show sm") == ["smollm2", "smollm2:135m"]


@pytest.mark.parametrize("breaks", [DEFAULT_BREAKS, DEFAULT_BREAKS.replace(":", "")],
                         ids=["default-wordbreaks", "colon-removed"])
def test_bash_completes_a_tag_after_the_colon_without_doubling(stored: None,
                                                              breaks: str) -> None:
    for line in ("llmctl run smollm2:", "llmctl run smollm2:1"):
        replies = bash_complete(line, breaks)
        assert len(replies) == 1, replies
        assert inserted(line, replies[0], breaks) == "llmctl run smollm2:135m"
    pulled = bash_complete("llmctl pull llama3.2:", breaks)
    finished = {inserted("llmctl pull llama3.2:", r, breaks) for r in pulled}
    for tag in ("1b", "3b", "1b-q8_0"):
        assert f"llmctl pull llama3.2:{tag}" in finished


def test_bash_completes_paths_and_conversations(stored: None, llmctl_home: Path,
                                                tmp_path: Path) -> None:
    (tmp_path / "weights-file.gguf").write_bytes(b"GGUF")
    assert bash_complete("llmctl pull ./weights", cwd=tmp_path) == ["./weights-file.gguf"]
    assert bash_complete("llmctl imagine tiny -o ./wei", cwd=tmp_path) == [
        "./weights-file.gguf"]
    (llmctl_home / "conversations").mkdir()
    (llmctl_home / "conversations" / "0badc0ffee12.json").write_text("{}")
    assert bash_complete("llmctl chat smollm2 --resume 0bad") == ["0badc0ffee12"]


# -- real interactive shells in tmux ---------------------------------------------------------

def typed(shell: list[str], setup: str, keys: str, expected: str, home: Path) -> str:
    """Start `shell` in tmux, run `setup`, type `keys` and Tab, and wait for `expected`
    on the screen: what the user would see."""
    session = f"llmctl-test-{os.getpid()}-{time.monotonic_ns()}"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": shell_env()["PATH"], "TERM": "xterm",
           "LLMCTL_HOME": os.environ["LLMCTL_HOME"]}
    command = "env -i " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                    f"{command} {' '.join(shell)}"], check=True, timeout=30)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True, timeout=30).stdout

        def wait_for(text: str) -> str:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if text in (shown := screen()):
                    return shown
                time.sleep(0.2)
            raise AssertionError(f"{text!r} never appeared:\n{screen()}")

        subprocess.run(["tmux", "send-keys", "-t", session, f"{setup}; echo READY", "Enter"],
                       check=True, timeout=30)
        wait_for("READY\n")
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", keys], check=True,
                       timeout=30)
        subprocess.run(["tmux", "send-keys", "-t", session, "Tab"], check=True, timeout=30)
        return wait_for(expected)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True,
                       timeout=30)


def test_bash_interactive_completes_the_tag(stored: None, tmp_path: Path) -> None:
    shown = typed(["bash", "--norc", "--noprofile"],
                  f"source {SCRIPTS / 'llmctl.bash'}", "llmctl run smollm2:1",
                  "llmctl run smollm2:135m", tmp_path / "home")
    assert "smollm2:smollm2" not in shown


def test_zsh_loads_the_script_and_completes_a_model(stored: None, tmp_path: Path) -> None:
    shown = typed(["zsh", "-f"], f"fpath=({SCRIPTS} $fpath); autoload -Uz compinit; "
                  "compinit -u", "llmctl run smollm2:1", "llmctl run smollm2:135m",
                  tmp_path / "home")
    assert "smollm2:smollm2" not in shown
    assert "command not found" not in shown and "no such" not in shown.lower()


def test_fish_loads_the_script_and_completes_models(stored: None, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    script = (f"source {SCRIPTS / 'llmctl.fish'}; complete -C 'llmctl run smollm2:1'; "
              "echo ---; complete -C 'llmctl pull llama3.2:'; echo ---; "
              "complete -C 'llmctl ru'")
    result = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True,
                            text=True, env={**shell_env(), "HOME": str(home)}, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    model, pull, command = (
        [line.split("\t")[0] for line in part.strip().splitlines()]
        for part in result.stdout.split("---"))
    assert model == ["smollm2:135m"]
    assert {"llama3.2:1b", "llama3.2:3b", "llama3.2:1b-q8_0"} <= set(pull)
    assert command == ["run"]


# -- the generated files, help and man pages -------------------------------------------------

def test_checked_in_files_are_what_the_generator_makes_now() -> None:
    stale = [str(path.relative_to(ROOT)) for path, text in shell_files.expected_files().items()
             if not path.exists() or path.read_text("utf-8") != text]
    assert not stale, ("regenerate with `python -m llmctl.cli.shell_files`: "
                       + ", ".join(stale))


@pytest.mark.parametrize("shell, name", [("bash", "llmctl.bash"), ("zsh", "_llmctl"),
                                         ("fish", "llmctl.fish")])
def test_completion_command_prints_the_checked_in_script(llmctl: Runner, shell: str,
                                                         name: str) -> None:
    result = llmctl("completion", shell)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (SCRIPTS / name).read_text()


def test_completion_refuses_an_unknown_shell(llmctl: Runner) -> None:
    result = llmctl("completion", "tcsh")
    assert result.returncode == 2
    assert "bash, zsh, fish" in result.stderr


def test_install_completion_writes_the_script_once(llmctl: Runner, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "SHELL": "/bin/bash"}
    for _ in range(2):
        result = llmctl("--install-completion", env=env)
        assert result.returncode == 0, result.stderr
    assert (home / ".bash_completions" / "llmctl.sh").read_text() == \
        (SCRIPTS / "llmctl.bash").read_text()
    assert (home / ".bashrc").read_text() == "source ~/.bash_completions/llmctl.sh\n"
    shown = llmctl("--show-completion", env={"SHELL": "/usr/bin/fish"})
    assert shown.stdout == (SCRIPTS / "llmctl.fish").read_text()


def all_commands() -> list[tuple[str, ...]]:
    from llmctl.cli.app import COMMANDS, _build

    found = []
    for name in COMMANDS:
        found.append((name,))
        found += [(name, sub) for sub in getattr(_build(name), "commands", None) or {}]
    return found


@pytest.mark.parametrize("command", all_commands(), ids=" ".join)
def test_every_command_has_help_with_examples_and_takes_h(llmctl: Runner,
                                                          command: tuple[str, ...]) -> None:
    long, short = llmctl(*command, "--help"), llmctl(*command, "-h")
    assert long.returncode == 0 and short.returncode == 0, long.stderr + short.stderr
    assert long.stdout == short.stdout
    assert "Examples:" in long.stdout
    assert re.search(r"^\s+llmctl " + re.escape(" ".join(command)), long.stdout, re.M)


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "man").glob("*.1")))
def test_man_pages_render_without_groff_warnings(page: str) -> None:
    path = ROOT / "man" / page
    checked = subprocess.run(["groff", "-man", "-ww", "-z", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    shown = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True,
                           env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"},
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "ENVIRONMENT", "FILES",
                    "EXIT STATUS", "SEE ALSO"):
        assert re.search(rf"^{section}$", shown.stdout, re.M), section
    assert "LLMCTL_HOME" in shown.stdout and "130" in shown.stdout


def test_a_man_page_per_command_and_subcommand() -> None:
    pages = {p.name for p in (ROOT / "man").glob("*.1")}
    assert "llmctl.1" in pages and "llmctl-run.1" in pages and "llmctl-catalog-add.1" in pages
    assert len(pages) == 1 + len(all_commands())
    run = (ROOT / "man" / "llmctl-run.1").read_text()
    assert r"\-\-temperature" in run and "[default: 0.8" in run  # options with defaults
    assert ".SH EXAMPLES" in run


def test_the_tools_the_tests_need_are_installed() -> None:
    # scripts/test.sh installs them (Debian packages); a missing one is a set-up fault.
    for tool in ("bash", "zsh", "fish", "tmux", "groff", "man"):
        assert shutil.which(tool), f"{tool} is not installed; run sh scripts/test.sh"
