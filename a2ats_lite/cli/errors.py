"""How the command line fails: the package's exceptions (and a few OS ones) become one
`error: ...` line on stderr and exit status 2, Ctrl-C becomes 130, a closed stdout 141;
the package's warnings become one `warning: ...` line each. _FLAG_HINTS adds which flag
changes an error the library reports.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import click

from ..errors import A2ATSError, CapacityError, ContextOverflowError, ContextWarning

EXIT_INTERRUPTED = 130    # 128 + SIGINT
EXIT_BROKEN_PIPE = 141    # 128 + SIGPIPE: what a shell reports for `cat` killed by it


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _broken_pipe() -> None:
    """stdout's reader went away: stop quietly. Later writes (and the interpreter's
    final flush) go to /dev/null so Python prints no 'Exception ignored' either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real fd (tests, embedded)
        pass
    sys.exit(EXIT_BROKEN_PIPE)


# the library says what is wrong; the CLI adds which of its flags change it
_FLAG_HINTS = {
    ContextOverflowError: " (raise -c/--ctx-size, or pass --truncate to keep the last tokens)",
    CapacityError: " (lower -c/--ctx-size or -n, or use --kv a2ats)",
}


def friendly_errors(fn):
    """Turn the package's errors (and a few OS ones) into one line + exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            _broken_pipe()
        except KeyboardInterrupt:   # e.g. Ctrl-C while the model loads
            click.echo("\n[interrupted]", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except A2ATSError as e:
            _fail(str(e) + _FLAG_HINTS.get(type(e), ""))
        except (OSError, ValueError) as e:
            _fail(str(e))
        except click.ClickException as e:  # usage errors found by the command itself
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code if e.exit_code else 2)
    return wrapper


@contextlib.contextmanager
def _warnings_to_stderr():
    """The package's warnings (e.g. a context past the training context) as one
    'warning: ...' line each, as llama.cpp prints them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, ContextWarning):
                    click.echo(f"warning: {w.message}", err=True)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
