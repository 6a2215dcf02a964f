"""The command line's generated help (featseq.common.options.config_options)."""
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


@pytest.mark.parametrize("command, configs", [
    ("featurize", ["featurize.config.FeaturizeConfig"]),
    ("predict", ["sequence.config.PredictConfig", "sequence.config.StreamConfig"]),
    ("train", ["sequence.config.TrainConfig"]),
])
def test_generated_flags_take_the_dataclass_defaults(command, configs):
    """issue 25: featurize's, predict's and stream's flags are generated from their config dataclasses like train's:
    every field with help is a flag whose default is the field's (so the CLI and the Python API agree), and each
    --help line shows its default once (a non-None one as click shows it)."""
    import dataclasses
    import importlib

    from featseq.common.options import meta

    cmd = main.commands[command]
    params = {p.name: p for p in cmd.params}
    opts = _options(CliRunner().invoke(main, [command, "--help"]).output)
    for path in configs:
        mod, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(f"featseq.{mod}"), name)
        for f in dataclasses.fields(cls):
            if not meta(cls, f.name) or f.name not in params or params[f.name].name != f.name:
                continue
            p = params[f.name]
            if f.name == "stride" and cls.__name__ == "StreamConfig":
                continue  # predict's flag, shared
            want = None if f.default is dataclasses.MISSING else f.default
            assert p.default == want, (command, f.name, p.default, want)
            flag = p.opts[0]
            text = opts[flag]
            assert text.count("[default:") <= 1, (flag, text)
            if not p.is_flag and want is not None:
                assert "[default:" in text, (flag, text)
    if command == "featurize":
        assert "--shard" in opts and "[default: auto]" in opts["--shard"]
        assert "--no-channels-last" in opts and params["channels_last"].default is True


def test_the_command_line_loads_no_heavy_library_to_start():
    """Generating the flags from the config dataclasses reads only torch-, numpy- and h5py-free modules (the configs,
    sequence/catalog.py, featurize/precision.py and the decoder names), so `featseq --help` starts fast."""
    import subprocess
    import sys

    from helpers import CHILD_ENV

    code = ("import sys, featseq.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'h5py', 'sklearn', 'av') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CHILD_ENV, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
