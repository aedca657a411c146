# fish completion for llmctl: `llmctl completion fish` writes it; do not edit.
function __llmctl_complete
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
