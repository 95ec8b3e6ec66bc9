"""The ``sagaline`` command line: run an app's services, submit commands, query and trace them.

The app is named by ``--app package.module:attribute`` (or ``$SAGALINE_APP``, or ``app`` in the
``[tool.sagaline]`` table of ``pyproject.toml``); the reference order system when none is. An
app's own commands (:attr:`App.commands <sagaline.app.App.commands>`) join the CLI's; they use
the tools this package exports, so that they look and fail like sagaline's own commands.

Every command takes ``--store URL`` (default ``$SAGALINE_STORE_URL``, else
``sqlite:///./sagaline.db``); query commands take ``--json`` for machine-readable output on
stdout. Errors go to stderr: exit code 2 for bad input, 1 for anything else that went wrong.
A one-shot command gives up on a database or broker it cannot reach after ``--connect-timeout``
seconds (``$SAGALINE_CONNECT_TIMEOUT``, default 10); ``run``, ``serve`` and ``up`` wait for them.
URLs are shown without their passwords, and handed to child processes through the environment.

Text that comes from messages (reasons, ids, type names) is untrusted: it is printed inert, with
control characters replaced and rich markup escaped, so a payload cannot drive the terminal.
"""

import importlib
import sys

import typer

from sagaline.app import find_app
from sagaline.errors import ConfigurationError

# isort: split
# The commands join ``app`` as their modules are imported, in the order ``--help`` lists them.
from sagaline.cli import run as run

# isort: split
from sagaline.cli import audit as audit

# isort: split
from sagaline.cli import dead_letters as dead_letters

# isort: split
from sagaline.cli import saga as saga
from sagaline.cli.audit import load_transaction
from sagaline.cli.common import (
    DEFAULT_STORE_URL,
    BusOption,
    JsonOption,
    StoreOption,
    app,
    app_option,
    check_urls,
    current_app,
    use_app,
    with_deployment,
)
from sagaline.cli.common import _errors as errors
from sagaline.cli.common import _settings as settings
from sagaline.cli.render import (
    STATUS_STYLES,
    cell,
    emit_json,
    err,
    fail,
    inert,
    out,
    print_trace,
    quoted,
    styled_status,
)
from sagaline.config import redact_url
from sagaline.observability import TransactionTrace, load_trace

# For an app's own commands (App.commands): they use these, so that they take the same options,
# open deployments the same way and look and fail like sagaline's own commands.
#   with_deployment: open the deployment, do the work with it, close it.
#   fail: print an error (already inert markup) on stderr and exit with a status.
#   inert, quoted: untrusted text made inert for the terminal; quoted as a literal.
#   emit_json, cell, styled_status: JSON on stdout; a table cell; a status in its colour.
#   (Stores are read through the deployment itself: deployment.queries(service), and
#   deployment.audit_sources() for every store and a database bus.)
#   print_trace, load_transaction: a transaction's causal tree, with notes for its first line;
#     a saga's trace.
#   load_trace, TransactionTrace: a transaction's messages and saga, read from every store.
#   redact_url: a URL without its password, for what is printed.
#   check_urls, errors: exit with a clear error unless the URLs are supported; errors as
#     messages and exit codes.
#   settings: the command line's own options (``settings.connect_timeout``).
__all__ = [
    "DEFAULT_STORE_URL",
    "STATUS_STYLES",
    "BusOption",
    "JsonOption",
    "StoreOption",
    "TransactionTrace",
    "app",
    "cell",
    "check_urls",
    "current_app",
    "emit_json",
    "errors",
    "fail",
    "inert",
    "load_trace",
    "load_transaction",
    "main",
    "out",
    "print_trace",
    "quoted",
    "redact_url",
    "settings",
    "styled_status",
    "with_deployment",
]


def main() -> None:
    """Run the ``sagaline`` command line, with the commands of the app it works on."""
    try:
        loaded = use_app(find_app(app_option(sys.argv[1:])))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ConfigurationError as exc:
        err.print(f"[bold red]error:[/] --app: {inert(exc)}", soft_wrap=True)
        sys.exit(2)
    commands = loaded.commands
    if isinstance(commands, str):
        module, _, attribute = commands.partition(":")
        commands = getattr(importlib.import_module(module), attribute or "commands")
    if commands is not None:
        app.add_typer(commands)
    app(prog_name="sagaline")
