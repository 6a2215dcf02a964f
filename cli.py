"""featseq command line: a thin click layer. Each command builds a config, calls one function, prints the result path
last; the commands live beside what they run (featurize/commands.py, sequence/commands.py) and are assembled here.
Errors in the user's input exit with code 2 and a clear message."""
from __future__ import annotations

import os
import sys

import click

from featseq.featurize import commands as featurize_commands
from featseq.sequence import commands as sequence_commands


class Main(click.Group):
    """The command group. Errors in what the user asked for (featseq.common.errors.UserError, ValueError from option
    validation, a missing file) and a full disk (featseq.common.files.DiskFullError, a UserError) end as ``error: ...``
    with exit code 2 here, in one place; a decode worker that cannot start ends with exit code 1. SIGTERM and SIGINT
    stop every command cleanly (featseq.common.signals): finished work is kept, exit code 143 or 130."""

    def invoke(self, ctx):
        from featseq.common.signals import Interrupted, on_signals
        from featseq.featurize.worker import WorkerStartError

        try:
            with on_signals():
                return super().invoke(ctx)
        except Interrupted as e:
            click.echo(f"stopped by {e.name}: finished work is kept; rerun the same command to go on", err=True)
            ctx.exit(e.exit_code)
        except (ValueError, FileNotFoundError) as e:  # UserError is a ValueError
            click.echo(f"error: {e}", err=True)
            from featseq.featurize import writer

            if writer.HDF5_WRITE_FAILED:  # HDF5 would crash shutting down after a failed write (files.py)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            ctx.exit(2)
        except WorkerStartError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featseq")
def main():
    """featseq: cache per-frame CNN features of video segments once, train sequence models on them."""


for _command in (featurize_commands.featurize, featurize_commands.cache, featurize_commands.synth,
                 sequence_commands.train, sequence_commands.sweep, sequence_commands.evaluate,
                 sequence_commands.finetune, sequence_commands.predict, sequence_commands.explain, sequence_commands.compare,
                 sequence_commands.report, sequence_commands.run_group):
    main.add_command(_command)


if __name__ == "__main__":
    main()
