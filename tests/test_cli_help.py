"""The command line's generated help (cli._config_options)."""
import re

import pytest
from click.testing import CliRunner

from featseq.cli import main


def _options(text: str) -> dict[str, str]:
    """--flag -> its help text, wrapped lines joined."""
    out, flag = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if m:
            flag = m.group(2)
            out[flag] = line
        elif flag and line.startswith(" " * 10):
            out[flag] += " " + line.strip()
        else:
            flag = None
    return out


@pytest.mark.parametrize("command", ["train", "sweep", "compare", "finetune"])
def test_every_option_shows_one_default(command):
    """issue 24 item 11: the comma-list options of sweep and compare said '[default: the cache's fps]. Comma list to
    sweep [default: none].' Each option shows one default, the one its help gives where it gives one."""
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0, r.output
    opts = _options(r.output)
    assert "--fps" in opts and "--model" in opts
    for flag, text in opts.items():
        assert text.count("[default:") <= 1, (flag, text)
    if command in ("sweep", "compare"):
        assert "Comma list to sweep [default: the cache's fps]" in opts["--fps"], opts["--fps"]
        assert "Comma list to sweep [default: lstm]" in opts["--model"], opts["--model"]
