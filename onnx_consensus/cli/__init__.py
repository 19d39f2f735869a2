"""`onnx-cprune`: prune (default), finetune, inspect, bench. Parses arguments, calls the pipeline, prints.

Exit codes (README, "Exit codes"): 0 done (also when there is no removable block); 1 an unexpected failure
(an onnxruntime error; one line, --debug for the traceback); 2 bad usage or bad input; 3 target cannot be
met (nothing written); 4 fine-tuning failed (pruned model kept); 130 interrupted. Nothing is written on a
failure unless --keep-partial.
"""
from __future__ import annotations

import os
import signal
import sys

from ..errors import ConsensusError

__all__ = ["main", "settle", "exit_process"]


_INTERRUPTED: list[int] = []  # the signals received: a failure after one is reported as the interrupt


def _terminate(signum, frame):
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def settle(code: int) -> int:
    """``code``, with SIGINT and SIGTERM ignored from now on: the job is done and its exit code stands. A
    signal landing during the interpreter's shutdown would otherwise kill a run that wrote its output (Python
    puts the default handlers back while it finalises)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def exit_process(code: int):
    """Exit with ``settle(code)``. A torchrun rank (WORLD_SIZE > 1, torch.distributed imported) leaves through
    ``os._exit`` once stdout and stderr are flushed: gloo threads still joinable at interpreter shutdown abort
    the process ("terminate called without an active exception", exit -6) and would replace its exit code."""
    code = settle(code)
    if "torch.distributed" in sys.modules and os.environ.get("WORLD_SIZE", "1") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _handler(command: str):
    """The command's function, imported with SIGINT and SIGTERM held: an interrupt landing inside a C
    extension's initialisation (numpy's) would surface as "ImportError: initialization failed"; held, it
    arrives right after the imports, as a KeyboardInterrupt."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return _import_handler(command)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _import_handler(command: str):
    if command == "prune":
        from .prune import cmd_prune as handler
    elif command == "finetune":
        from .finetune import cmd_finetune as handler
    elif command == "inspect":
        from .inspect import cmd_inspect as handler
    else:
        from .bench import cmd_bench as handler
    return handler


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        # SIGTERM is an interrupt from the first moment (inside the try, so that one landing right after the
        # handler is installed still gets exit 130): the imports below take a while on a busy machine
        signal.signal(signal.SIGTERM, _terminate)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the shell ignores it (&)
            signal.signal(signal.SIGINT, _terminate)
        argv = list(sys.argv[1:] if argv is None else argv)
        import logging

        from .parser import COMMANDS, build_parser

        if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
            argv.insert(0, "prune")
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                            format="onnx-cprune: %(levelname)s: %(message)s")
        return _handler(args.command)(args)
    except KeyboardInterrupt:
        return _interrupted(args)
    except ConsensusError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"onnx-cprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # an unexpected failure still gets one line; --debug shows the traceback
        if _INTERRUPTED:  # e.g. "ImportError: initialization failed": a C extension's import interrupted
            return _interrupted(args)
        if getattr(args, "debug", False):
            raise
        from ..errors import first_lines

        hint = ""
        if "invalid dimensions for input" in str(exc):
            hint = "; the model may fix a dim the data does not have (check the inputs' shapes with `inspect`)"
        print(f"onnx-cprune: error: {type(exc).__name__}: {first_lines(exc)}{hint} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


def _interrupted(args) -> int:
    kept = getattr(args, "keep_partial", False)
    print(f"onnx-cprune: interrupted{'' if kept else '; nothing written'}", file=sys.stderr)
    return 130
