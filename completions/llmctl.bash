# bash completion for llmctl: `llmctl completion bash` writes it; do not edit.
# Words are split at spaces only (not at
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
