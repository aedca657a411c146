"""llmctl completion: the tab-completion script for bash, zsh or fish."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SHELLS = ("bash", "zsh", "fish")


def completion(
    shell: Annotated[str, typer.Argument(
        metavar="SHELL", help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the tab-completion script for bash, zsh or fish.

    The script completes commands, options, option values, model names (`name:tag`, tags
    after the colon included, in bash whatever COMP_WORDBREAKS holds), catalog models for
    pull, conversation IDs and paths. It asks `llmctl __complete`, which reads the store
    without loading any engine. completions/ in the source tree holds the same scripts.

    Examples:

    \b
        echo 'eval "$(llmctl completion bash)"' >> ~/.bashrc
        llmctl completion zsh > ~/.zfunc/_llmctl    # with fpath=(~/.zfunc $fpath) before compinit
        llmctl completion fish > ~/.config/fish/completions/llmctl.fish
    """
    from llmctl.cli.output import Output

    Output().text(script(shell))


def detected_shell() -> str:
    """The user's shell, from $SHELL (what --install-completion and --show-completion
    serve when no shell is named)."""
    import os

    from llmctl.errors import UsageError

    name = os.path.basename(os.environ.get("SHELL", ""))
    if name not in SCRIPTS:
        raise UsageError(f"cannot tell which shell completion is for (SHELL={name or 'unset'})",
                         hint="use: llmctl completion bash|zsh|fish")
    return name


# Where --install-completion puts each script, and the line that makes the shell read it
# (None: the shell reads the folder by itself).
INSTALL = {
    "bash": (".bash_completions/llmctl.sh", ".bashrc",
             "source ~/.bash_completions/llmctl.sh"),
    "zsh": (".zfunc/_llmctl", ".zshrc",
            "fpath=(~/.zfunc $fpath); autoload -Uz compinit; compinit"),
    "fish": (".config/fish/completions/llmctl.fish", None, None),
}


def install(shell: str, home: Path) -> Path:
    """Write the script where `shell` finds it and, once, the line that loads it into the
    shell's start-up file. Returns the script's path."""
    from llmctl.store.layout import write_atomically

    relative, rc, line = INSTALL[shell]
    target = home / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, script(shell).encode(), sync=False)
    if rc is not None and line is not None:
        startup = home / rc
        text = startup.read_text("utf-8") if startup.exists() else ""
        if line not in text:
            with startup.open("a", encoding="utf-8") as file:
                file.write(("" if not text or text.endswith("\n") else "\n") + line + "\n")
    return target


def script(shell: str) -> str:
    from llmctl.errors import UsageError

    if shell not in SCRIPTS:
        raise UsageError(f"no completion for the shell '{shell}'",
                         hint=f"choose one of: {', '.join(SHELLS)}")
    return SCRIPTS[shell]


HEADER = "# {shell} completion for llmctl: `llmctl completion {shell}` writes it; do not edit.\n"

BASH = HEADER.format(shell="bash") + r"""# Words are split at spaces only (not at
# COMP_WORDBREAKS' ':' and '='), so `smollm2:1` reaches llmctl whole; what bash treats
# as the word before its last break character is cut from each value again, so that
# nothing is typed twice (`smollm2:smollm2:135m`).
_llmctl() {
    local line=${COMP_LINE:0:COMP_POINT}
    local -a words lines
    read -r -a words <<< "$line"
    if [[ -z $line || $line == *[[:space:]] ]]; then words+=(""); fi
    local index=$(( ${#words[@]} - 1 ))
    local cur=${words[index]}
    mapfile -t lines < <(command llmctl __complete bash "$index" -- "${words[@]}" 2>/dev/null)
    COMPREPLY=()
    case ${lines[0]} in
        files | dirs)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen "-${lines[0]:0:1}" -- "$cur")
            return 0 ;;
    esac
    local prefix="" i value
    for (( i = ${#cur} - 1; i >= 0; i-- )); do
        if [[ $COMP_WORDBREAKS == *"${cur:i:1}"* ]]; then prefix=${cur:0:i+1}; break; fi
    done
    for value in "${lines[@]:1}"; do
        value=${value%%$'\t'*}
        COMPREPLY+=("${value#"$prefix"}")
    done
    return 0
}
complete -F _llmctl llmctl
"""

ZSH = "#compdef llmctl\n" + HEADER.format(shell="zsh") + r"""_llmctl() {
    local -a lines described
    local line value
    local index=$(( CURRENT - 1 ))
    lines=("${(@f)$(command llmctl __complete zsh $index -- "${(@)words[1,CURRENT]}" 2>/dev/null)}")
    case ${lines[1]} in
        files) _files; return ;;
        dirs) _files -/; return ;;
    esac
    for line in "${(@)lines[2,-1]}"; do
        [[ -z $line ]] && continue
        value=${line%%$'\t'*}
        if [[ $line == *$'\t'* ]]; then
            described+=("${value//:/\\:}:${line#*$'\t'}")
        else
            described+=("${value//:/\\:}")
        fi
    done
    _describe -V -t values llmctl described
}
if [[ $funcstack[1] == _llmctl ]]; then
    _llmctl "$@"
else
    compdef _llmctl llmctl
fi
"""

FISH = HEADER.format(shell="fish") + r"""function __llmctl_complete
    set -l tokens (commandline -opc) (commandline -ct)
    set -l lines (command llmctl __complete fish (math (count $tokens) - 1) -- $tokens 2>/dev/null)
    switch "$lines[1]"
        case files
            __fish_complete_path (commandline -ct)
        case dirs
            __fish_complete_directories (commandline -ct)
        case '*'
            set -e lines[1]
            printf '%s\n' $lines
    end
end
complete -c llmctl -f -a '(__llmctl_complete)'
"""

SCRIPTS = {"bash": BASH, "zsh": ZSH, "fish": FISH}
