"""Prints the README's flag tables (one per --help group) from main.py's parser (config.get_args_parser):

    python tools/flag_table.py        # paste between the README's flag-table markers
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402


def _default(dest: str, default, help_text: str) -> str:
    shown = config.ORIGINAL_DEFAULTS.get(dest, default)
    stated = re.search(r"\(default: ([^)]*)\)", help_text)  # a default that depends on the dataset, as --help says
    if shown is None and stated:
        text = stated.group(1)
    else:
        text = "`(required)`" if shown is None else f"`{shown}`"
    if dest in config.SYNTHETIC_PRESET:
        text += f" (synthetic: `{config.SYNTHETIC_PRESET[dest]}`)"
    return text


def flag_tables() -> str:
    parser = config.get_args_parser()
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = "general" if group.title == "options" else group.title
        out += [f"### {title}", ""]
        if group.description:
            out += [group.description[0].upper() + group.description[1:] + ".", ""]
        out += ["| flag | meaning | default |", "|---|---|---|"]
        for a in actions:
            text = re.sub(r" ?\(default: [^)]*\)| ?\[synthetic: [^\]]*\]", "", a.help or "")
            text = text.replace("|", "\\|")
            out.append(f"| `{a.option_strings[0]}` | {text} | {_default(a.dest, a.default, a.help or '')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(flag_tables())
