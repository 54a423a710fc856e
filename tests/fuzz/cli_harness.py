"""Run `dbtrimkv.cli.main` in-process and classify the outcome: a clear error, success, or a traceback."""

from __future__ import annotations

import contextlib
import io
import traceback

from dbtrimkv import cli


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); an exception escaping main is returned as status -1 with its traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - the fuzz reports it
            err.write(traceback.format_exc())
            code = -1
    return code, out.getvalue(), err.getvalue()


def assert_one_clear_error(argv: list[str], expect: str | None = None) -> str:
    code, _, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.startswith("dbtrimkv: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, f"{argv}: status {code}\n{err}"
    if expect is not None:
        assert expect in lines[0], lines[0]
    return lines[0]
