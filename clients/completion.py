"""`molteniron completion bash`: a bash completion script made from the CLI's own parser.

Made when asked (the install kit writes it once), so it names every command and
option of the molteniron that printed it. It completes commands, options, the
choices of an option or argument (-t human|csv|json, maintenance on|off) and file
names where a FILE or DIR is wanted; not node or pool names (that would ask the
worker at every TAB).
"""

from __future__ import annotations

import argparse
import shlex

from molteniron import __version__

TOP = "."  # the top level's key in the script's tables (bash refuses an empty key)

SCRIPT = """\
# bash completion for molteniron {version}, made by `molteniron completion bash` from its
# own argument parser: make it again after an upgrade. It completes commands, options
# and their fixed choices, and file names where a FILE or DIR is wanted.
_molteniron() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local command={top} word i positional=0 key
    local -A options=(
{options}
    )
    # The options that take a value: " -a --b ... " (spaces at both ends).
    local -A valued=(
{valued}
    )
    # What completes a value, by "COMMAND OPTION" or "COMMAND #N" (N-th argument):
    # its choices, @file or @dir.
    local -A values=(
{values}
    )
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        if [[ $word == -* ]]; then
            [[ ${{valued[$command]}} == *" $word "* ]] && ((i++))
        elif [[ $command == {top} ]]; then
            command=$word
        else
            ((positional++))
        fi
    done
    [[ -n ${{options[$command]+set}} ]] || return 0  # not a command of molteniron
    if ((COMP_CWORD > 1)) && [[ ${{valued[$command]}} == *" $prev "* ]]; then
        key="$command $prev"
    elif [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "${{options[$command]}}" -- "$cur")
        return 0
    elif [[ $command == {top} ]]; then
        mapfile -t COMPREPLY < <(compgen -W {commands} -- "$cur")
        return 0
    else
        key="$command #$((positional + 1))"
    fi
    case ${{values[$key]}} in
        @file) compopt -o filenames 2>/dev/null
               mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
        @dir) compopt -o filenames 2>/dev/null
              mapfile -t COMPREPLY < <(compgen -d -- "$cur") ;;
        *) mapfile -t COMPREPLY < <(compgen -W "${{values[$key]}}" -- "$cur") ;;
    esac
    return 0
}}
complete -F _molteniron molteniron
"""


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The completion script for parser (the CLI's, with its command parsers)."""
    commands = {TOP: parser}
    for action in parser._actions:  # noqa: SLF001 (argparse has no public walk)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            commands.update(action.choices)
    options: list[str] = []
    valued: list[str] = []
    values: list[str] = []
    for name, command_parser in commands.items():
        flags: list[str] = []
        with_value: list[str] = []
        position = 0
        for action in command_parser._actions:  # noqa: SLF001
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                continue
            if not action.option_strings:
                position += 1
                _value(values, f"{name} #{position}", action)
                continue
            flags += action.option_strings
            if action.nargs != 0:
                with_value += action.option_strings
                for option in action.option_strings:
                    _value(values, f"{name} {option}", action)
        options.append(_entry(name, " ".join(flags)))
        valued.append(_entry(name, f" {' '.join(with_value)} "))
    return SCRIPT.format(version=__version__, top=TOP, options="\n".join(options),
                         valued="\n".join(valued), values="\n".join(values),
                         commands=shlex.quote(" ".join(name for name in commands
                                                       if name != TOP)))


def _value(values: list[str], key: str, action: argparse.Action) -> None:
    """values' entry for what completes action's value, if anything does."""
    if action.choices:
        values.append(_entry(key, " ".join(map(str, action.choices))))
    elif action.metavar in ("FILE", "DIR"):
        values.append(_entry(key, "@" + action.metavar.lower()))


def _entry(key: str, words: str) -> str:
    return f"        [{shlex.quote(key)}]={shlex.quote(words)}"
